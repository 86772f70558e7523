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
    """The one way every front end names a model: a built-in (plugin) name such as ``demo``, a user model
    registered with ``wsi-llava models add``, or a checkpoint folder (ours, or official LLaVA format).

    ``model_base`` is the base LLM of a LoRA checkpoint passed as a folder (e.g. llava-v1.5-7b).
    """
    from wsi_llava import plugins, registry
    from wsi_llava.model.checkpoint import load_checkpoint
    from wsi_llava.settings import default_dtype

    dtype = dtype or default_dtype(device)
    builtin = plugins.models()
    name = str(name_or_path)
    if isinstance(name_or_path, str) and name in builtin:
        return builtin[name].fn(device=device, dtype=dtype)
    user = registry.user_model(name) if isinstance(name_or_path, str) else None
    if user is not None:
        try:
            return load_checkpoint(user, device=device, dtype=dtype, model_base=model_base)
        except ModelError as e:
            raise ModelError(f"model {name!r} ({user}): {e}") from None
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return load_checkpoint(path, device=device, dtype=dtype, model_base=model_base)
    known = sorted([*builtin, *registry.user_models()])
    raise ModelError(
        f"model {name!r}: not a built-in or registered model ({', '.join(known) or 'none'}) and not a "
        "checkpoint folder; register one with `wsi-llava models add NAME --llava ... --tile-encoder ...`"
    )


def __getattr__(name: str) -> Any:
    if name == "WSILlava":
        from wsi_llava.model.wsi_llava import WSILlava

        return WSILlava
    raise AttributeError(name)
