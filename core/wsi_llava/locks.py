"""Inter-process locks on a lock file, so that one process builds a cached thing while the others wait.

The locks are the OS's (``flock`` through :mod:`filelock`): the kernel drops them when the holding process
dies, however it dies, so a killed run never leaves a lock that blocks the next one. Lock files stay in place
after release (deleting them would let two processes lock two different files of one name).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from wsi_llava.errors import WsiLlavaError
from wsi_llava.progress import CancelToken

logger = logging.getLogger(__name__)

_POLL_SECONDS = 0.2


def file_lock(path: str | Path) -> FileLock:
    """A re-entrant lock on ``path`` (created with its folder on first use)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path))


def try_lock(lock: FileLock) -> bool:
    """Take ``lock`` if it is free right now; the caller releases it."""
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return False
    return True


@contextlib.contextmanager
def holding(
    lock: FileLock,
    what: str,
    *,
    timeout: float | None = None,
    cancel: CancelToken | None = None,
    on_wait: Callable[[], None] | None = None,
    error: type[WsiLlavaError] = WsiLlavaError,
) -> Iterator[None]:
    """Hold ``lock`` for the block, waiting (cancellably) while another process holds it.

    ``what`` names the locked thing in the log and in the ``error`` raised after ``timeout`` seconds (None
    waits as long as it takes). ``on_wait`` is called once if the lock is not free at first.
    """
    if not try_lock(lock):
        logger.info("waiting for %s: another process holds %s", what, lock.lock_file)
        if on_wait is not None:
            on_wait()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if cancel is not None:
                cancel.raise_if_cancelled()
            left = _POLL_SECONDS if deadline is None else min(_POLL_SECONDS, deadline - time.monotonic())
            if left <= 0:
                raise error(f"{what} is busy: another process holds {lock.lock_file}")
            try:
                lock.acquire(timeout=left)
                break
            except Timeout:
                continue
    try:
        yield
    finally:
        lock.release()
