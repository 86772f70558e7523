"""Precomputed visual tokens on disk: the released WSI-Bench ``.pt`` features (576 x 1024 per slide)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wsi_llava.errors import WsiLlavaError


def load_visual_tokens(path: str | Path, in_dim: int) -> Any:
    """A ``(n_tokens, in_dim)`` float32 tensor from a ``.pt`` file (a leading batch axis of 1 is dropped)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise WsiLlavaError(
            f"{path}: no such feature file (expected a .pt tensor of {in_dim}-d visual tokens)"
        )
    try:
        visual = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WsiLlavaError(f"{path}: cannot read the feature tensor ({type(e).__name__}: {e})") from None
    if isinstance(visual, torch.Tensor) and visual.dim() == 3 and visual.shape[0] == 1:
        visual = visual[0]  # as the official loader's .squeeze(0)
    if not isinstance(visual, torch.Tensor) or visual.dim() != 2 or visual.shape[1] != in_dim:
        shape = tuple(visual.shape) if isinstance(visual, torch.Tensor) else type(visual).__name__
        raise WsiLlavaError(f"{path}: expected a (n_tokens, {in_dim}) tensor of visual tokens, got {shape}")
    return visual.float()
