"""Process-wide defaults: cache location and device choice, resolved lazily (no torch at import)."""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from pathlib import Path

_SCOPED_CACHE: contextvars.ContextVar[Path | None] = contextvars.ContextVar("wsi_llava_cache", default=None)


def cache_dir(override: str | Path | None = None) -> Path:
    """Where features and converted LLM weights are cached: ``override``, the root of an enclosing
    :func:`using_cache_dir`, ``$WSI_LLAVA_CACHE`` or ~/.cache/wsi-llava."""
    if override is not None:
        return Path(override).expanduser()
    scoped = _SCOPED_CACHE.get()
    if scoped is not None:
        return scoped
    env = os.environ.get("WSI_LLAVA_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "wsi-llava"


@contextlib.contextmanager
def using_cache_dir(override: str | Path | None) -> Iterator[Path]:
    """Within the block every cache (features, converted LLMs, ...) lives under ``override`` (when given).

    How a ``--cache`` option or a ``cache_dir`` argument reaches code that loads a model, which takes none.
    """
    if override is None:
        yield cache_dir()
        return
    token = _SCOPED_CACHE.set(Path(override).expanduser())
    try:
        yield cache_dir()
    finally:
        _SCOPED_CACHE.reset(token)


def resolve_device(device: str = "auto") -> str:
    """``auto`` picks CUDA when available, else CPU; anything else is passed through."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


#: the dtypes a model's weights may take (``--dtype``)
DTYPES = ("float32", "bfloat16", "float16")


def default_dtype(device: str) -> str:
    """bf16 on CUDA (as the paper trains) and on a CPU that computes in bf16 (AVX512-BF16 or AMX), where it
    halves the weights' memory traffic and speeds up the matrix products; fp32 on other CPUs, which would
    only emulate bf16, slower than fp32. ``$WSI_LLAVA_CPU_DTYPE`` (``float32``, ``bfloat16``) fixes the
    CPU's choice, e.g. to get the same answers on every machine."""
    if device.startswith("cuda"):
        return "bfloat16"
    if device != "cpu":
        return "float32"
    chosen = os.environ.get("WSI_LLAVA_CPU_DTYPE", "").strip()
    if chosen:
        if chosen not in DTYPES:
            from wsi_llava.errors import WsiLlavaError

            raise WsiLlavaError(f"WSI_LLAVA_CPU_DTYPE={chosen!r}: expected one of {', '.join(DTYPES)}")
        return chosen
    return "bfloat16" if cpu_computes_bf16() else "float32"


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (AVX512-BF16 or AMX-BF16), as torch reports it."""
    import torch

    caps = getattr(torch.cpu, "get_capabilities", dict)()
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
