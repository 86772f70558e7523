"""Reading encoder weights from local files: safetensors, .bin or .pth, wrapped or prefixed."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from wsi_llava.errors import ModelError


def read_state_dict(
    path: Path, what: str, wrappers: Sequence[str], prefixes: Sequence[str], hint: str = ""
) -> dict[str, torch.Tensor]:
    """A flat state dict from ``path``: unwrap ``wrappers`` keys (e.g. ``model``), strip shared ``prefixes``.

    Errors name the file and ``what`` it should hold; ``hint`` is added when the file is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: {what} weights not found{hint}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: object = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(
            f"{path}: cannot read {what} weights ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
        ) from exc
    while isinstance(sd, dict):
        inner = next((sd[w] for w in wrappers if isinstance(sd.get(w), dict)), None)
        if inner is None:
            break
        sd = inner
    if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        raise ModelError(f"{path}: expected a state dict of tensors (optionally under a 'model' key)")
    changed = True
    while changed:
        changed = False
        for p in prefixes:
            if all(k.startswith(p) for k in sd):
                sd = {k[len(p) :]: v for k, v in sd.items()}
                changed = True
    return sd


def check_fits(own: dict[str, torch.Tensor], sd: dict[str, torch.Tensor], path: Path, what: str) -> None:
    """Raise ``ModelError`` naming a few missing, unexpected or mis-shaped keys when ``sd`` does not fit."""
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in sd and sd[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:4])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:4])})")
        if shapes:
            parts.append(f"{len(shapes)} mis-shaped (e.g. {'; '.join(shapes[:3])})")
        raise ModelError(f"{path}: weights do not fit the {what}: {'; '.join(parts)}")
