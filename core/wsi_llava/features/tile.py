"""Tile encoders on timm: built-in architectures, local weight loading, and the ``TileEncoder`` wrapper.

A tile encoder maps RGB ``uint8`` tiles to one feature vector each. ``encoder_id`` (name + sha256 of the
weights file, or ``random-seed<k>``) keys the feature cache, so features from other weights never mix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from wsi_llava.errors import ModelError

logger = logging.getLogger(__name__)

#: seed of the deterministic random initialisation used when no weights are given
RANDOM_SEED = 0

#: timm architecture and arguments per built-in name (Prov-GigaPath: the hub's config.json; UNI: its model card)
TIMM_SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    "prov-gigapath": (
        "vit_giant_patch14_dinov2",
        dict(
            img_size=224,
            in_chans=3,
            patch_size=16,
            embed_dim=1536,
            depth=40,
            num_heads=24,
            init_values=1e-5,
            mlp_ratio=5.33334,
            num_classes=0,
        ),
    ),
    "uni": (
        "vit_large_patch16_224",
        dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True),
    ),
    "demo-vit": (
        "vit_tiny_patch16_224",
        dict(img_size=112, patch_size=16, embed_dim=192, depth=4, num_heads=3, num_classes=0),
    ),
}

_WRAPPERS = ("state_dict", "model", "module", "teacher")
_PREFIXES = ("module.", "model.", "backbone.", "encoder.", "teacher.", "student.")
_SHA_CACHE: dict[tuple[str, int, int], str] = {}
_SHA_MEMO = "checksums.json"


def weights_sha256(path: Path) -> str:
    """sha256 of a weights file, computed once per file version.

    A Hugging Face cache file names its blob by its sha256, so nothing is read; other files are hashed
    once and remembered by (real path, size, mtime) in the process and in ``<cache>/checksums.json``,
    so a fresh process does not re-read gigabytes of weights.
    """
    from wsi_llava.sources import hub_blob_sha256

    path = Path(path)
    blob = hub_blob_sha256(path)
    if blob is not None:
        return blob
    real = Path(os.path.realpath(path))
    st = real.stat()
    key = (str(real), st.st_size, st.st_mtime_ns)
    if key in _SHA_CACHE:
        return _SHA_CACHE[key]
    memo = _read_memo()
    entry = memo.get(key[0])
    if entry and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
        _SHA_CACHE[key] = str(entry["sha256"])
        return _SHA_CACHE[key]
    h = hashlib.sha256()
    with open(real, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    _SHA_CACHE[key] = h.hexdigest()
    memo[key[0]] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _SHA_CACHE[key]}
    _write_memo(memo)
    return _SHA_CACHE[key]


def _memo_path() -> Path:
    from wsi_llava.settings import cache_dir

    return cache_dir() / _SHA_MEMO


def _read_memo() -> dict[str, Any]:
    try:
        data = json.loads(_memo_path().read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_memo(memo: dict[str, Any]) -> None:
    from wsi_llava.atomic import atomic_write_text

    try:
        _memo_path().parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(_memo_path(), json.dumps(memo, indent=1), fsync=False)
    except OSError as e:  # a read-only cache only costs hashing again next time
        logger.debug("checksum memo not written: %s", e)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read safetensors / .bin / .pth weights, unwrap ``state_dict``/``model`` keys and strip common prefixes."""
    from wsi_llava.features.weights import read_state_dict as read

    return read(path, "tile encoder", _WRAPPERS, _PREFIXES)


def load_weights_into(module: nn.Module, path: Path, what: str = "tile encoder") -> None:
    """Load ``path`` strictly into ``module``; mismatches raise ModelError naming a few keys."""
    path = Path(path)
    sd = read_state_dict(path)
    from wsi_llava.features.weights import check_fits

    own = module.state_dict()
    check_fits(own, sd, path, what)
    meta = any(t.is_meta for t in own.values())
    module.load_state_dict(sd, strict=True, assign=meta)


def build_timm_module(name: str, weights: Path | None = None) -> nn.Module:
    """The raw timm model of a built-in encoder: ``(B, 3, h, w)`` normalised → ``(B, embed_dim)``."""
    import timm

    if name not in TIMM_SPECS:
        raise ModelError(f"no built-in timm architecture named {name!r} (have: {', '.join(TIMM_SPECS)})")
    arch, kwargs = TIMM_SPECS[name]
    if weights is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            model = timm.create_model(arch, pretrained=False, **kwargs)
        return model.eval()
    weights = Path(weights)
    if not weights.is_file():
        raise ModelError(f"{weights}: weights for tile encoder {name!r} not found")
    with torch.device("meta"):  # no random init of parameters that the file replaces
        model = timm.create_model(arch, pretrained=False, **kwargs)
    load_weights_into(model, weights, f"{name!r} tile encoder")
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        model = timm.create_model(arch, pretrained=False, **kwargs)
        load_weights_into(model, weights, f"{name!r} tile encoder")
    return model.eval()


class TileEncoder(nn.Module):
    """A tile encoder with its preprocessing: ``encode(tiles uint8 (B, H, W, 3)) -> (B, embed_dim)``."""

    def __init__(
        self,
        name: str,
        model: nn.Module,
        *,
        embed_dim: int,
        input_size: int = 224,
        resize_size: int | None = None,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        interpolation: str = "bicubic",
        encoder_id: str,
        trained: bool,
        weights_sha256: str | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.model = model
        self.embed_dim = int(embed_dim)
        self.input_size = int(input_size)
        self.resize_size = int(resize_size or input_size)
        self.interpolation = interpolation
        self.encoder_id = encoder_id
        self.trained = trained
        self.weights_sha256 = weights_sha256
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def preprocess(self, tiles: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``(B, H, W, 3)`` uint8 → ``(B, 3, s, s)`` float32 on the encoder's device.

        Resize (``interpolation``, antialiased) so the shorter side is ``resize_size``, centre-crop
        ``input_size``, normalise; as Prov-GigaPath's Resize 256 → CenterCrop 224 → Normalize, on the tensor.
        """
        x = torch.as_tensor(tiles)
        if x.dim() != 4 or x.shape[-1] != 3:
            raise ModelError(f"tiles must be (B, H, W, 3) RGB, got {tuple(x.shape)}")
        x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        h, w = x.shape[-2:]
        if min(h, w) != self.resize_size:
            s = self.resize_size / min(h, w)
            size = (max(self.resize_size, round(h * s)), max(self.resize_size, round(w * s)))
            mode = self.interpolation if self.interpolation in ("bicubic", "bilinear") else "bicubic"
            x = F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True).clamp_(0.0, 1.0)
        h, w = x.shape[-2:]
        c = self.input_size
        if (h, w) != (c, c):
            if min(h, w) < c:
                raise ModelError(f"tiles of {h}x{w} px are smaller than the encoder input {c}x{c}")
            top, left = (h - c) // 2, (w - c) // 2
            x = x[..., top : top + c, left : left + c]
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised ``(B, 3, s, s)`` → ``(B, embed_dim)``."""
        out = self.model(x)
        if out.dim() != 2 or out.shape[-1] != self.embed_dim:
            raise ModelError(
                f"tile encoder {self.name!r} returned {tuple(out.shape)}, expected (B, {self.embed_dim})"
            )
        return out

    def encode(self, tiles: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Preprocess and encode uint8 tiles."""
        return self(self.preprocess(tiles))


def build_tile_encoder(name: str, weights: Path | str | None = None) -> TileEncoder:
    """Build a registered tile encoder (``wsi_llava.plugins.tile_encoders()``), random-init when ``weights`` is None."""
    from wsi_llava import plugins

    registry = plugins.tile_encoders()
    if name not in registry:
        raise ModelError(
            f"unknown tile encoder {name!r}; registered: {', '.join(sorted(registry)) or 'none'}"
        )
    entry = registry[name]
    wpath = Path(weights) if weights is not None else None
    if wpath is not None and not wpath.is_file():
        raise ModelError(f"{wpath}: weights for tile encoder {name!r} not found")
    build: Callable[..., nn.Module] = entry.fn
    model = build(wpath)
    if not isinstance(model, nn.Module):
        raise ModelError(f"tile encoder {name!r} from {entry.plugin} did not return a torch module")
    meta = entry.meta
    if "embed_dim" not in meta:
        raise ModelError(f"tile encoder {name!r} from {entry.plugin} was registered without embed_dim")
    sha = weights_sha256(wpath) if wpath is not None else None
    encoder_id = f"{name}:sha256-{sha[:16]}" if sha else f"{name}:random-seed{RANDOM_SEED}"
    if sha is None:
        logger.warning(
            "tile encoder %r has no weights: randomly initialised (seed %d), untrained", name, RANDOM_SEED
        )
    enc = TileEncoder(
        name,
        model,
        embed_dim=int(meta["embed_dim"]),
        input_size=int(meta.get("input_size", 224)),
        resize_size=meta.get("resize_size"),
        mean=meta.get("mean", (0.485, 0.456, 0.406)),
        std=meta.get("std", (0.229, 0.224, 0.225)),
        encoder_id=encoder_id,
        trained=sha is not None,
        weights_sha256=sha,
    )
    return enc.eval()


class TokenPooled(nn.Module):
    """A token-returning backbone (``(B, T, D)``, as Virchow) pooled to class token ⊕ mean patch token."""

    def __init__(self, inner: nn.Module, num_prefix_tokens: int) -> None:
        super().__init__()
        self.inner = inner
        self.num_prefix_tokens = max(1, int(num_prefix_tokens))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.inner(x)
        return torch.cat([tokens[:, 0], tokens[:, self.num_prefix_tokens :].mean(dim=1)], dim=-1)


def build_tile_encoder_from_folder(
    folder: Path | str, timm_kwargs: dict[str, Any] | None = None
) -> TileEncoder:
    """A ``TileEncoder`` from a timm hub folder (Prov-GigaPath, UNI, ...), keyed by its weights' sha256."""
    from wsi_llava.features import timm_hub

    folder = Path(folder)
    info = timm_hub.inspect_folder(folder, timm_kwargs)
    model = timm_hub.build_model(folder, timm_kwargs)
    if info.token_output:
        model = TokenPooled(model, getattr(model, "num_prefix_tokens", 1))
    sha = weights_sha256(Path(info.weights))
    prep = info.preprocessing
    enc = TileEncoder(
        info.architecture,
        model,
        embed_dim=info.embed_dim,
        input_size=prep.input_size,
        resize_size=prep.resize_size,
        mean=prep.mean,
        std=prep.std,
        interpolation=prep.interpolation,
        encoder_id=f"{info.architecture}:sha256-{sha[:16]}",
        trained=True,
        weights_sha256=sha,
    )
    logger.info("tile encoder %s from %s (%d-d)", info.architecture, folder, info.embed_dim)
    return enc.eval()
