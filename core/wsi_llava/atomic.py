"""Atomic writes: a file or a folder appears complete under its name, or not at all.

Everything is written under a temporary name in the same folder and renamed into place
(``os.replace`` is atomic on one file system); the temporary is removed on every failure path.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _umask_mode() -> int:
    return 0o666 & ~_umask()


def atomic_write_bytes(path: str | Path, data: bytes, *, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` by replace-by-rename.

    A symlinked ``path`` keeps its link (the file it points to is replaced); an existing file keeps its
    permission bits, a new one gets the umask's default, as ``open(path, "w")`` would.
    """
    path = Path(path)
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    directory = target.parent if str(target.parent) else Path(".")
    try:
        mode = stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        mode = _umask_mode()
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str, *, fsync: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` by replace-by-rename (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


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
def atomic_folder(target: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it becomes ``target``, on failure it is removed.

    With ``replace``, an existing ``target`` is moved aside first and deleted only once the new folder is
    in place, so a crash leaves the old folder or the new one, never neither. The folder gets the umask's
    default mode, as ``mkdir`` would give it (not ``mkdtemp``'s owner-only one).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not replace:
        raise FileExistsError(f"{target}: already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
