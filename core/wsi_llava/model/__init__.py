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

__all__ = ["ModelSpec", "WSILlava", "load_model", "load_tile_encoder"]


def _resolve(name_or_path: str | Path) -> tuple[str, Any]:
    """Where a model name points: ``("builtin", plugin entry)`` or ``("folder", (folder, registered name))``.

    The one resolution every loader shares: built-in (plugin) names first, then registered user models,
    then checkpoint folders.
    """
    from wsi_llava import plugins, registry

    builtin = plugins.models()
    name = str(name_or_path)
    if isinstance(name_or_path, str) and name in builtin:
        return "builtin", builtin[name]
    user = registry.user_model(name) if isinstance(name_or_path, str) else None
    if user is not None:
        return "folder", (user, name)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return "folder", (path, None)
    known = sorted([*builtin, *registry.user_models()])
    raise ModelError(
        f"model {name!r}: not a built-in or registered model ({', '.join(known) or 'none'}) and not a "
        "checkpoint folder; register one with `wsi-llava models add NAME --llava ... --tile-encoder ...`"
    )


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
    from wsi_llava.model.checkpoint import load_checkpoint
    from wsi_llava.settings import default_dtype

    dtype = dtype or default_dtype(device)
    kind, target = _resolve(name_or_path)
    if kind == "builtin":
        return target.fn(device=device, dtype=dtype)
    folder, registered = target
    try:
        return load_checkpoint(folder, device=device, dtype=dtype, model_base=model_base)
    except ModelError as e:
        if registered is None:
            raise
        raise ModelError(f"model {registered!r} ({folder}): {e}") from None


def load_tile_encoder(name_or_path: str | Path, device: str = "cpu") -> tuple[Any, ModelSpec]:
    """The tile encoder a model featurizes slides with, and the model's spec, without loading its LLM.

    Built exactly as :func:`load_model` + ``WSILlava.build_tile_encoder`` build it, so features extracted
    with it are the ones ``ask`` on that model reads from the cache. A built-in model whose plugin does
    not say where its checkpoint is (``meta["checkpoint"]``) is loaded whole once.
    """
    from wsi_llava.model.build import build_tile_encoder
    from wsi_llava.model.spec import SPEC_FILE
    from wsi_llava.settings import default_dtype

    kind, target = _resolve(name_or_path)
    if kind == "builtin":
        where = target.meta.get("checkpoint")
        if where is None:
            model = target.fn(device=device, dtype=default_dtype(device))
            model.require_slide_ready()
            return model.build_tile_encoder(), model.spec
        spec, folder = where()
        label = target.name
    else:
        folder, registered = target
        label = registered or str(folder)
        if not (folder / SPEC_FILE).is_file():
            raise ModelError(
                f"model {label!r}: an official LLaVA checkpoint has no tile encoder (it takes precomputed "
                "visual tokens); register it with its encoders: "
                "`wsi-llava models add NAME --llava FOLDER --tile-encoder FOLDER`"
            )
        spec = ModelSpec.load(folder)
    if spec.slide_encoder is None:
        raise ModelError(
            f"model {label!r} has no slide encoder: it takes precomputed visual tokens, never tile features"
        )
    try:
        encoder = build_tile_encoder(spec, folder)
    except ModelError as e:
        raise ModelError(f"model {label!r}: {e}") from None
    if not encoder.trained and not (spec.demo or spec.untrained):
        raise ModelError(
            f"model {label!r}: its tile encoder {spec.tile_encoder.name!r} has no weights and would be random"
        )
    return encoder, spec


def __getattr__(name: str) -> Any:
    if name == "WSILlava":
        from wsi_llava.model.wsi_llava import WSILlava

        return WSILlava
    raise AttributeError(name)
