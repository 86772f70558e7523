"""Process-wide defaults: cache location and device choice, resolved lazily (no torch at import)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(override: str | Path | None = None) -> Path:
    """Where features and converted LLM weights are cached: ``override``, ``$WSI_LLAVA_CACHE`` or ~/.cache."""
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get("WSI_LLAVA_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "wsi-llava"


def resolve_device(device: str = "auto") -> str:
    """``auto`` picks CUDA when available, else CPU; anything else is passed through."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> str:
    """bf16 on CUDA (as the paper trains), fp32 on CPU."""
    return "bfloat16" if device.startswith("cuda") else "float32"
