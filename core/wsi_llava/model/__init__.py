"""The WSI-LLaVA model: projector + LLM, prompt templates, streaming generation, checkpoint I/O.

Importing this package does not import torch; ``WSILlava`` and the loaders import it on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsi_llava.errors import ModelError
from wsi_llava.model.spec import ModelSpec

if TYPE_CHECKING:
    from wsi_llava.model.wsi_llava import WSILlava

__all__ = ["ModelSpec", "WSILlava", "load_model"]


def load_model(
    name_or_path: str | Path,
    device: str = "cpu",
    dtype: str | None = None,
    *,
    model_base: str | Path | None = None,
) -> WSILlava:
    """A registered model by name (e.g. ``demo``), else a checkpoint folder (ours, then LLaVA format).

    A LoRA LLaVA checkpoint needs ``model_base`` (the merged llava-v1.5-7b folder).
    """
    from wsi_llava import plugins
    from wsi_llava.settings import default_dtype

    dtype = dtype or default_dtype(device)
    registered = plugins.models()
    if isinstance(name_or_path, str) and name_or_path in registered:
        return registered[name_or_path].fn(device=device, dtype=dtype)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        from wsi_llava.model.checkpoint import load_checkpoint

        return load_checkpoint(path, device=device, dtype=dtype, model_base=model_base)
    raise ModelError(
        f"model {str(name_or_path)!r}: not a registered model ({', '.join(sorted(registered)) or 'none'}) "
        "and not a checkpoint folder"
    )


def __getattr__(name: str) -> Any:
    if name == "WSILlava":
        from wsi_llava.model.wsi_llava import WSILlava

        return WSILlava
    raise AttributeError(name)
