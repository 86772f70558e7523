"""Tile encoders published as timm hub folders (Prov-GigaPath, UNI, Virchow, ...).

Such a folder holds ``config.json`` (``architecture``, ``model_args``, ``pretrained_cfg``) and
``model.safetensors`` or ``pytorch_model.bin``. The model is built by timm's own local-folder loading
(``timm.create_model("local-dir:FOLDER", pretrained=True)``, without a random initialisation first); the
preprocessing (resize, centre crop, interpolation, mean/std) comes from the folder's ``pretrained_cfg``
through timm's data config, and is applied on tensors by :class:`~wsi_llava.features.tile.TileEncoder`
on the CPU and GPU paths alike. Models whose forward returns tokens (``global_pool: ""``, as Virchow)
are pooled by :class:`~wsi_llava.features.tile.TokenPooled` (class token ⊕ mean patch token, Virchow's
model card).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from wsi_llava.errors import ModelError

logger = logging.getLogger(__name__)

#: weight files timm looks for in a local folder, in its order of preference
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")
#: modules whose attributes a --tile-encoder-arg value may name (e.g. timm.layers.SwiGLUPacked)
_IMPORTABLE = ("timm.", "torch.nn.")
_ARGS_HINT = (
    " (if the model card passes extra arguments to timm.create_model, e.g. Virchow's "
    "mlp_layer=timm.layers.SwiGLUPacked act_layer=torch.nn.SiLU, give them with --tile-encoder-arg KEY=VALUE)"
)


class Preprocessing(BaseModel):
    """How tiles become the encoder's input: shorter side to ``resize_size``, centre crop ``input_size``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_size: int
    resize_size: int
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


class TimmFolderInfo(BaseModel):
    """What a timm hub folder holds, read without loading its weights."""

    model_config = ConfigDict(extra="forbid")

    folder: str
    architecture: str
    weights: str
    embed_dim: int
    token_output: bool
    n_params: int
    preprocessing: Preprocessing


def is_timm_folder(folder: Path) -> bool:
    """Whether ``folder`` looks like a timm hub folder (config.json naming an ``architecture``)."""
    cfg = Path(folder) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return "architecture" in json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def read_config(folder: Path) -> dict[str, Any]:
    """The folder's ``config.json``; errors name the file and what a timm hub config holds."""
    path = Path(folder) / "config.json"
    if not Path(folder).is_dir():
        raise ModelError(f"tile encoder {folder}: not a folder (expected a timm hub folder with config.json)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(
            f"tile encoder {folder}: no config.json (expected a timm hub folder: config.json with "
            "'architecture', 'model_args', 'pretrained_cfg', and model.safetensors or pytorch_model.bin)"
        ) from None
    except ValueError as e:
        raise ModelError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or "architecture" not in cfg:
        kind = (
            cfg.get("model_type") or (cfg.get("architectures") or ["?"])[0] if isinstance(cfg, dict) else "?"
        )
        raise ModelError(
            f"{path}: not a timm hub config (no 'architecture'; this looks like a {kind} model): "
            "the tile encoder must be a timm folder such as Prov-GigaPath's or UNI's"
        )
    return cfg


def weights_file(folder: Path) -> Path:
    """The weights file timm would load from ``folder``."""
    for name in WEIGHT_FILES:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    raise ModelError(
        f"tile encoder {folder}: no weights (expected one of {', '.join(WEIGHT_FILES)} beside config.json)"
    )


def resolve_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``timm.create_model`` arguments with dotted names (``timm.layers.SwiGLUPacked``) made objects."""
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        if isinstance(value, str) and value.startswith(_IMPORTABLE) and "." in value:
            module, _, attr = value.rpartition(".")
            try:
                out[key] = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError):
                raise ModelError(f"tile encoder argument {key}={value}: no such object") from None
        else:
            out[key] = value
    return out


def _create(folder: Path, kwargs: dict[str, Any], *, pretrained: bool) -> Any:
    import timm

    try:
        return timm.create_model(f"local-dir:{folder}", pretrained=pretrained, **resolve_kwargs(kwargs))
    except ModelError:
        raise
    except RuntimeError as e:
        text = str(e).splitlines()[0][:300]
        hint = ""
        if "size mismatch" in str(e) or "Missing key" in str(e) or "Unexpected key" in str(e):
            hint = _ARGS_HINT
        raise ModelError(f"tile encoder {folder}: timm cannot build it: {text}{hint}") from None
    except Exception as e:
        raise ModelError(
            f"tile encoder {folder}: timm cannot build it ({type(e).__name__}: {str(e).splitlines()[0][:300]})"
        ) from None


def preprocessing(model: Any) -> Preprocessing:
    """The folder's preprocessing as timm resolves it (``resolve_data_config`` of the built model)."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    _, h, w = cfg["input_size"]
    if h != w:
        raise ModelError(f"tile encoder input {h}x{w}: only square inputs are supported")
    crop_pct = float(cfg.get("crop_pct") or 1.0)
    interpolation = str(cfg.get("interpolation") or "bicubic")
    if interpolation not in ("bicubic", "bilinear", "nearest"):
        interpolation = "bicubic"
    return Preprocessing(
        input_size=int(h),
        resize_size=math.floor(h / crop_pct),
        interpolation=interpolation,
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
    )


def _output_width(model: Any, size: int) -> tuple[int, bool]:
    """Feature width and whether the model returns tokens, from a forward pass on the meta device."""
    import torch

    with torch.no_grad():
        out = model(torch.empty(1, 3, size, size, device="meta"))
    if out.dim() == 2:
        return int(out.shape[-1]), False
    if out.dim() == 3:
        return 2 * int(out.shape[-1]), True
    raise ModelError(f"tile encoder returns {tuple(out.shape)}: expected (B, D) features or (B, T, D) tokens")


def inspect_folder(folder: Path, kwargs: dict[str, Any] | None = None) -> TimmFolderInfo:
    """Architecture, feature width, preprocessing and a key/shape check of the weights, without loading them."""
    import torch

    from wsi_llava.features.weights import check_fits, read_shapes

    folder = Path(folder)
    cfg = read_config(folder)
    wfile = weights_file(folder)
    with torch.device("meta"):
        model = _create(folder, kwargs or {}, pretrained=False)
    shapes = read_shapes(wfile, "tile encoder")
    try:
        check_fits(
            {k: v.shape for k, v in model.state_dict().items()},
            shapes,
            wfile,
            f"{cfg['architecture']} tile encoder of {folder / 'config.json'}",
        )
    except ModelError as e:
        raise ModelError(f"{e}{_ARGS_HINT}") from None
    prep = preprocessing(model)
    width, tokens = _output_width(model, prep.input_size)
    return TimmFolderInfo(
        folder=str(folder),
        architecture=str(cfg["architecture"]),
        weights=str(wfile),
        embed_dim=width,
        token_output=tokens,
        n_params=sum(math.prod(s) for s in shapes.values()),
        preprocessing=prep,
    )


def build_model(folder: Path, kwargs: dict[str, Any] | None = None) -> Any:
    """The timm model with the folder's weights, built by timm's own local-dir loading.

    It runs without a random initialisation first (``no_init``): a giant ViT is not initialised in full
    only to be overwritten, and its weights are not held twice; an architecture that cannot be built that
    way is built normally.
    """
    from wsi_llava.features.no_init import build_without_init

    folder = Path(folder)
    read_config(folder)
    weights_file(folder)
    model = build_without_init(lambda: _create(folder, kwargs or {}, pretrained=True))
    if model is None:
        model = _create(folder, kwargs or {}, pretrained=True)
    return model.eval()
