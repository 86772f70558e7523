"""Reading encoder weights from local files: safetensors, .bin or .pth, wrapped or prefixed."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from wsi_llava.errors import ModelError


def _load(path: Path, what: str, hint: str, shapes_only: bool) -> object:
    if not path.is_file():
        raise ModelError(f"{path}: {what} weights not found{hint}")
    try:
        if path.suffix == ".safetensors":
            if shapes_only:
                from safetensors import safe_open

                with safe_open(str(path), "pt") as f:
                    return {k: torch.Size(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
            from safetensors.torch import load_file

            return load_file(str(path))
        try:  # mmap: only the pages that are read come from disk (all of them for a full load)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as exc:
        raise ModelError(
            f"{path}: cannot read {what} weights (corrupt, truncated, or not a plain tensor file) "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
        ) from exc


def _unwrap(sd: object, path: Path, what: str, wrappers: Sequence[str], prefixes: Sequence[str]) -> dict:
    while isinstance(sd, dict):
        inner = next((sd[w] for w in wrappers if isinstance(sd.get(w), dict)), None)
        if inner is None:
            break
        sd = inner
    if (
        not isinstance(sd, dict)
        or not sd
        or not all(isinstance(v, torch.Tensor | torch.Size) for v in sd.values())
    ):
        raise ModelError(
            f"{path}: expected a state dict of tensors (optionally under a 'model' key) for the {what}"
        )
    changed = True
    while changed:
        changed = False
        for p in prefixes:
            if all(k.startswith(p) for k in sd):
                sd = {k[len(p) :]: v for k, v in sd.items()}
                changed = True
    return sd


def read_state_dict(
    path: Path, what: str, wrappers: Sequence[str], prefixes: Sequence[str], hint: str = ""
) -> dict[str, torch.Tensor]:
    """A flat state dict from ``path``: unwrap ``wrappers`` keys (e.g. ``model``), strip shared ``prefixes``.

    Errors name the file and ``what`` it should hold; ``hint`` is added when the file is missing.
    """
    path = Path(path)
    return _unwrap(_load(path, what, hint, shapes_only=False), path, what, wrappers, prefixes)


def read_shapes(
    path: Path,
    what: str,
    wrappers: Sequence[str] = ("state_dict", "model"),
    prefixes: Sequence[str] = ("module.", "_orig_mod."),
    hint: str = "",
) -> dict[str, torch.Size]:
    """Key -> shape of a weights file without reading its tensor data (safetensors header, mmap'd zip)."""
    path = Path(path)
    sd = _unwrap(_load(path, what, hint, shapes_only=True), path, what, wrappers, prefixes)
    return {k: v if isinstance(v, torch.Size) else v.shape for k, v in sd.items()}


def _shape(x: object) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else tuple(x)  # type: ignore[arg-type, attr-defined]


def misfit(own: dict[str, object], sd: dict[str, object]) -> list[str]:
    """How the weights ``sd`` miss the layout ``own``: a few missing, unexpected and mis-shaped keys
    (one phrase each kind); empty when they fit. Values are tensors or shapes (headers alone do)."""
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k} {_shape(sd[k])} vs {_shape(v)}"
        for k, v in own.items()
        if k in sd and _shape(sd[k]) != _shape(v)
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:4])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:4])})")
    if shapes:
        parts.append(f"{len(shapes)} mis-shaped (e.g. {'; '.join(shapes[:3])})")
    return parts


def check_fits(own: dict[str, object], sd: dict[str, object], path: Path, what: str) -> None:
    """Raise ``ModelError`` naming a few missing, unexpected or mis-shaped keys when ``sd`` does not fit."""
    parts = misfit(own, sd)
    if parts:
        raise ModelError(f"{path}: weights do not fit the {what}: {'; '.join(parts)}")
