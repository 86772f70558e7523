"""Building a model's parts from its spec: the tile encoder, the slide encoder and their weight files.

The bottom of the model package's imports: ``checkpoint``, ``llava_import``, ``parts`` and ``wsi_llava``
all build parts through here, and this module imports none of them, so imports go one way
(``checkpoint`` → ``llava_import`` → ``wsi_llava`` → ``build``). Torch, timm and the encoders are
imported inside the builders, so importing this stays cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wsi_llava.errors import ModelError
from wsi_llava.model.spec import SPEC_FILE, ModelSpec
from wsi_llava.sources import resolve_source

#: the trained parts' files inside one of our checkpoint folders
PROJECTOR_FILE = "projector.safetensors"
SLIDE_ENCODER_FILE = "slide_encoder.safetensors"
TILE_ENCODER_FILE = "tile_encoder.safetensors"


def inner_source(folder: Path, source: str, what: str) -> Path:
    """A source named inside a checkpoint: relative to its folder when it exists there, else as given."""
    local = Path(folder) / source
    if not Path(source).is_absolute() and not source.startswith("hf://") and local.exists():
        return local
    return resolve_source(source, what)


def part_path(folder: Path | None, source: str, what: str) -> Path:
    """A part named in a checkpoint's spec, found inside ``folder`` when there, else resolved as a source."""
    return inner_source(folder, source, what) if folder is not None else resolve_source(source, what)


def first_line(e: BaseException) -> str:
    """``Type: first line`` of an exception, for one-line errors."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def load_into(module: Any, path: Path, what: str) -> None:
    """Load ``path`` (safetensors) into ``module`` strictly; a missing, corrupt or misfitting file is one clear error."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise ModelError(f"{path}: missing ({what} weights of this checkpoint)")
    try:
        state = load_file(str(path))
    except Exception as e:  # SafetensorError, OSError...: a truncated, corrupt or unreadable file
        raise ModelError(
            f"{path}: cannot read the {what} weights, the file is truncated or corrupt ({first_line(e)})"
        ) from None
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelError(f"{path}: {what} weights do not fit the spec ({e})") from None


def build_slide_encoder(spec: ModelSpec, folder: Path | None = None) -> Any:
    """A ``SlideEncoder`` from ``spec.slide_encoder`` (None when the model takes precomputed tokens).

    With ``spec.slide_encoder_weights`` (Prov-GigaPath's ``slide_encoder.pth``) its LongNet weights are
    loaded; otherwise the caller loads ``slide_encoder.safetensors`` of the checkpoint.
    """
    if spec.slide_encoder is None:
        return None
    from wsi_llava.slide_encoder.slide_encoder import SlideEncoder, SlideEncoderConfig

    try:
        cfg = SlideEncoderConfig(**spec.slide_encoder)
    except Exception as e:
        raise ModelError(f"{SPEC_FILE}: slide_encoder: {e}") from None
    if spec.slide_encoder_weights:
        path = part_path(folder, spec.slide_encoder_weights, "slide encoder")
        if path.suffix == ".safetensors":  # another wsi-llava checkpoint's own (stage-1 tuned) encoder
            encoder = SlideEncoder(cfg)
            load_into(encoder, path, "slide encoder")
            return encoder
        return SlideEncoder.from_gigapath(path, config=cfg)
    return SlideEncoder(cfg)


def own_tile_encoder(spec: ModelSpec) -> bool:
    """Whether the tile encoder was trained with the checkpoint (its weights in the folder): it runs in
    the fp32 it was trained in, where an encoder built apart from the model may run in bf16."""
    return spec.tile_encoder.weights == TILE_ENCODER_FILE


def build_tile_encoder(spec: ModelSpec, folder: Path | None) -> Any:
    """The registered tile encoder ``spec.tile_encoder.name`` (a ``TileEncoder``) with this checkpoint's weights.

    Relative weight paths resolve against the checkpoint folder; the encoder id (which keys the
    feature cache) is the weights file's checksum, or the random-init seed when there are none.
    """
    from wsi_llava.features.tile import build_tile_encoder as build
    from wsi_llava.features.tile import build_tile_encoder_from_folder

    te = spec.tile_encoder
    if te.source:
        enc = build_tile_encoder_from_folder(part_path(folder, te.source, "tile encoder"), te.timm_kwargs)
        if te.embed_dim is not None and enc.embed_dim != te.embed_dim:
            raise ModelError(
                f"tile encoder {te.source}: gives {enc.embed_dim}-d features, {te.embed_dim}-d when the model "
                "was added: the folder changed (add the model again)"
            )
        return enc
    weights = te.weights
    if weights is None:
        return build(spec.tile_encoder.name, weights=None)
    path = Path(weights)
    if not path.is_absolute() and folder is not None:
        path = Path(folder) / path
    if not path.exists():
        raise ModelError(f"{SPEC_FILE}: tile_encoder.weights {str(path)!r} does not exist")
    return build(spec.tile_encoder.name, weights=path)


def tile_encoder_id(spec: ModelSpec, checkpoint_dir: str | Path | None = None, built: Any = None) -> str:
    """The feature-cache id of ``spec``'s tile encoder (name + weights checksum), without building it."""
    from wsi_llava.features.tile import RANDOM_SEED, weights_sha256

    if built is not None:
        return str(built.encoder_id)
    te = spec.tile_encoder
    if te.source is not None:
        from wsi_llava.features.timm_hub import weights_file

        path = weights_file(
            part_path(Path(checkpoint_dir) if checkpoint_dir else None, te.source, "tile encoder")
        )
    elif te.weights is not None:
        path = Path(te.weights)
        if not path.is_absolute() and checkpoint_dir is not None:
            path = Path(checkpoint_dir) / path
    else:
        return f"{te.name}:random-seed{RANDOM_SEED}"
    return f"{te.name}:sha256-{weights_sha256(path)[:16]}"
