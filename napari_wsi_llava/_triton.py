"""Load triton safely inside napari, so that ``torch.compile`` keeps working for every plugin.

triton's ``libtriton.so`` carries its own LLVM and exports its symbols. napari's canvas starts OpenGL
first; with Mesa (llvmpipe, radeonsi) that loads the system ``libLLVM`` into the global symbol scope, and
a later ``import triton`` then binds libtriton's LLVM calls to Mesa's LLVM and crashes in its static
initialisers. Loading libtriton with ``RTLD_DEEPBIND`` makes it bind to its own copy first.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys

logger = logging.getLogger(__name__)


def foreign_llvm_loaded() -> bool:
    """Whether a shared ``libLLVM`` (Mesa's, with OpenGL up) is mapped into this process (Linux only)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            return any("libLLVM" in line for line in maps)
    except OSError:
        return False


def preload_triton() -> None:
    """Import triton now, if it is installed and not loaded yet, so that later imports reuse it.

    Only when a foreign LLVM is already mapped is it loaded with ``RTLD_DEEPBIND``; otherwise this is a
    plain import. A triton that fails to import is left to fail again where torch asks for it.
    """
    if "triton" in sys.modules or importlib.util.find_spec("triton") is None:
        return
    isolate = hasattr(os, "RTLD_DEEPBIND") and foreign_llvm_loaded()
    flags = sys.getdlopenflags() if isolate else None
    if flags is not None:
        sys.setdlopenflags(flags | os.RTLD_DEEPBIND)
    try:
        import triton  # noqa: F401
    except Exception as e:  # a broken triton install: torch reports it when it needs triton
        logger.warning("triton is installed but failed to import: %s", e)
    finally:
        if flags is not None:
            sys.setdlopenflags(flags)
    logger.debug("loaded triton%s", " bound to its own LLVM (RTLD_DEEPBIND)" if isolate else "")
