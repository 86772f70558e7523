"""Atomic writes: a file or a folder appears complete under its name, or not at all.

Everything is written under a temporary name in the same folder and renamed into place
(``os.replace`` is atomic on one file system); the temporary is removed on every failure path.
A symlinked destination keeps its link (what it points to is replaced); an existing destination
keeps its permission bits, a new one gets the umask's default, as ``open(path, "w")`` would.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (setting it races other threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _umask_mode(base: int) -> int:
    return base & ~_umask()


def _destination(path: str | Path) -> Path:
    """Where a write to ``path`` lands: the file a symlink points to, else ``path`` itself."""
    path = Path(path)
    if path.is_symlink():
        return Path(os.path.realpath(path))
    return path


def _mode_for(target: Path, base: int) -> int:
    try:
        return stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        return _umask_mode(base)


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_writable(path: str | Path) -> Path:
    """Raise ``OSError`` (naming ``path``) unless a file can be written at ``path`` by :func:`atomic_path`.

    Probes by creating and removing a temporary file beside the destination, so a read-only folder
    or file system is found before any long work whose result would be lost.
    """
    target = _destination(path)
    if target.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(path))
    if not target.parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, "its folder does not exist", str(target.parent))
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as e:
        raise type(e)(e.errno, e.strerror, str(target.parent)) from None
    os.close(fd)
    os.unlink(probe)
    return target


@contextlib.contextmanager
def atomic_path(path: str | Path, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary file path beside ``path`` to write to; on success it replaces ``path``.

    For writers that take a file name (e.g. ``tifffile``). On any failure, or when the block raises,
    the temporary file is removed and ``path`` is left as it was.
    """
    target = _destination(path)
    mode = _mode_for(target, 0o666)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if fsync:
        _fsync_dir(target.parent)


def atomic_write_bytes(path: str | Path, data: bytes, *, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` by replace-by-rename (see :func:`atomic_path`)."""
    with atomic_path(path, fsync=fsync) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, *, fsync: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` by replace-by-rename (see :func:`atomic_path`)."""
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` in one atomic step (Linux ``renameat2``); False where that is unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _swap_in(new: Path, target: Path) -> None:
    """Put folder ``new`` at ``target``; an existing ``target`` stays whole until the new one is there.

    Where the file system can exchange two names atomically, it does; otherwise the old folder is
    renamed aside, the new one in, and the old one restored if that fails. The old copy is deleted
    last; failing to delete it leaves the new folder in place and a warning naming the leftover.
    """
    if not os.path.lexists(target):
        os.replace(new, target)
        return
    if _exchange(new, target):
        old = new  # after the swap the temporary name holds the old folder
    else:
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        aside = old / target.name
        os.replace(target, aside)
        try:
            os.replace(new, target)
        except BaseException:
            os.replace(aside, target)
            shutil.rmtree(old, ignore_errors=True)
            raise
    _fsync_dir(target.parent)
    try:
        shutil.rmtree(old)
    except OSError as e:
        logger.warning("%s: saved; the previous copy could not be removed from %s (%s)", target, old, e)


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` to disk, so a renamed-in folder is complete after a crash."""
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


#: the temporary names :func:`atomic_folder` uses beside its target (``tempfile.mkdtemp`` adds 8 characters)
_FOLDER_LEFTOVER = re.compile(r"\.(?P<target>.+)\.(?:tmp|old)-[a-z0-9_]{8}")


def folder_leftover_target(name: str) -> str | None:
    """The target name whose :func:`atomic_folder` temporary (new or moved-aside) folder is called ``name``.

    What a killed writer leaves behind; only the holder of the target's lock may remove it while another
    writer could still be filling it.
    """
    m = _FOLDER_LEFTOVER.fullmatch(name)
    return m.group("target") if m else None


@contextlib.contextmanager
def atomic_folder(target: str | Path, *, replace: bool = False, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it becomes ``target``, on failure it is removed.

    With ``replace``, an existing ``target`` is replaced so that at every moment the old or the new
    complete folder is under its name (see :func:`_swap_in`). The folder gets the umask's
    default mode, as ``mkdir`` would give it (not ``mkdtemp``'s owner-only one).
    """
    target = _destination(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a folder", str(target))
    if target.exists() and not replace:
        raise FileExistsError(errno.EEXIST, "already exists", str(target))
    mode = _mode_for(target, 0o777)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        if fsync:
            _fsync_tree(tmp)
        os.chmod(tmp, mode)
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_folder(filled: str | Path, target: str | Path, *, fsync: bool = True) -> Path:
    """Put an already filled folder (e.g. one several processes wrote into) at ``target``, replacing it.

    For writers that cannot use :func:`atomic_folder`'s own temporary; ``filled`` must be on the same file
    system (beside ``target``). An existing ``target`` stays whole until the new one is in place.
    """
    filled, target = Path(filled), _destination(target)
    if fsync:
        _fsync_tree(filled)
    _swap_in(filled, target)
    return target
