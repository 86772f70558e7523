"""Compiled artifacts that outlive the process: ``torch.compile``'s on-disk caches under our cache folder.

Inductor keeps what it compiles on disk and reuses it in a later process whose graph, inputs and
software match: the FX graph cache (generated code, its Triton kernels bundled), the AOTAutograd cache
and the Triton kernel cache. Both graph caches are on by default (torch 2.14 here), but they live under
``$TMPDIR/torchinductor_$USER``, which tmp cleaning empties and a fresh container does not have.
:func:`configure` points them at ``<cache>/torch-compile`` (the folder of
:func:`wsi_llava.settings.cache_dir`, beside the features), so the second process, and every serve
worker after the first, loads the compiled tile encoder and decode step instead of compiling them again.

Configuration is an environment variable that torch reads whenever it compiles (and passes on to its
compile workers). Importing ``torch._dynamo`` (timm does) already sets it to torch's default, so that
value counts as unset; any other value, a user's own ``TORCHINDUCTOR_CACHE_DIR`` or an earlier call's,
is kept. Every compiled piece calls :func:`configure` before its first ``torch.compile``; the first call
of a process decides the folder for that process. ``TRITON_CACHE_DIR`` is left alone (unset, torch puts
Triton's cache under ours). Inductor's precompiled C++ headers (CPU code only; nothing compiles on the
CPU by default) stay under torch's temporary folder, which it fixes at import. torch's "mega-cache"
(``torch.compiler.save_cache_artifacts``) is not used: it packs these same entries to carry them to
another machine, which a shared cache folder makes unnecessary.
"""

from __future__ import annotations

import getpass
import logging
import os
import tempfile
from pathlib import Path

from wsi_llava.settings import cache_dir

logger = logging.getLogger(__name__)

#: the variable torch's inductor reads for its cache folder (FX graphs, AOTAutograd, Triton, C++ builds)
ENV_VAR = "TORCHINDUCTOR_CACHE_DIR"
#: the sub-folder of our cache folder that holds torch's compile caches
SUBDIR = "torch-compile"


def compile_cache_dir(root: str | Path | None = None) -> Path:
    """Where :func:`configure` puts torch's compile caches: ``<root or settings.cache_dir()>/torch-compile``."""
    return cache_dir(root) / SUBDIR


def _torch_default() -> str:
    """torch's own default folder, which importing ``torch._dynamo`` writes into the environment."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        return os.path.abspath(default_cache_dir())
    except ImportError:  # a torch without that module: its formula
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = f"uid_{os.getuid()}"
        return os.path.abspath(os.path.join(tempfile.gettempdir(), f"torchinductor_{user}"))


def chosen_dir() -> Path | None:
    """The folder set before us: ``TORCHINDUCTOR_CACHE_DIR`` when it names one other than torch's default
    (the user's, or an earlier :func:`configure`'s); None otherwise."""
    current = os.environ.get(ENV_VAR)
    if current and os.path.abspath(current) != _torch_default():
        return Path(current)
    return None


def configure(root: str | Path | None = None) -> Path | None:
    """Make torch's compile caches live under our cache folder unless :func:`chosen_dir` names another;
    returns the folder in use (None: ours cannot be created, so torch keeps its default).

    Cheap and idempotent: call it before every ``torch.compile`` of the core.
    """
    chosen = chosen_dir()
    if chosen is not None:
        return chosen
    target = compile_cache_dir(root).resolve()
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # an unwritable cache folder: torch keeps its own default, compiling still works
        logger.warning("compile cache: cannot create %s (%s); torch's default folder is used", target, e)
        return None
    os.environ[ENV_VAR] = str(target)
    logger.info("compile cache: torch.compile artifacts live under %s", target)
    return target
