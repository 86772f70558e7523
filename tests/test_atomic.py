"""The one atomic-write mechanism: files and folders appear complete under their name or not at all.

Failures are injected where a real one would strike (the rename, the final delete) and the tests
check what is on disk afterwards: the old or the new complete content, no temporary left behind.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path

import pytest

from wsi_llava import atomic
from wsi_llava.atomic import atomic_folder, atomic_path, atomic_write_text, check_writable


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name or ".old-" in p.name)


def test_file_keeps_link_and_mode_new_file_follows_umask(tmp_path, umask):
    real = tmp_path / "data" / "real.txt"
    real.parent.mkdir()
    real.write_text("old")
    real.chmod(0o640)
    link = tmp_path / "link.txt"
    link.symlink_to(real)
    atomic_write_text(link, "new")
    assert link.is_symlink() and real.read_text() == "new" and _mode(real) == 0o640
    assert _leftovers(real.parent) == [] and _leftovers(tmp_path) == []

    umask(0o022)
    atomic_write_text(tmp_path / "a.txt", "x")
    assert _mode(tmp_path / "a.txt") == 0o644
    umask(0o077)
    atomic_write_text(tmp_path / "b.txt", "x")
    assert _mode(tmp_path / "b.txt") == 0o600


def test_file_failure_keeps_old_content_and_removes_temp(tmp_path, monkeypatch):
    target = tmp_path / "keep.txt"
    target.write_text("original")

    def no_space(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(atomic.os, "replace", no_space)
    with pytest.raises(OSError, match="No space"):
        atomic_write_text(target, "new")
    monkeypatch.undo()
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer crashed")
    assert target.read_text() == "original"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_check_writable_names_what_is_wrong(tmp_path):
    assert check_writable(tmp_path / "new.geojson") == tmp_path / "new.geojson"
    with pytest.raises(FileNotFoundError, match="folder does not exist") as e:
        check_writable(tmp_path / "missing" / "out.geojson")
    assert e.value.filename == str(tmp_path / "missing")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        check_writable(tmp_path)
    assert list(tmp_path.iterdir()) == []


def _folder_with(path: Path, text: str) -> None:
    (path / "a.txt").write_text(text)
    (path / "sub").mkdir()
    (path / "sub" / "b.txt").write_text(text)


def _content(path: Path) -> tuple[str, str]:
    return (path / "a.txt").read_text(), (path / "sub" / "b.txt").read_text()


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "rename-aside"])
def test_folder_replace_keeps_old_when_rename_in_fails(tmp_path, monkeypatch, exchange):
    target = tmp_path / "ckpt"
    with atomic_folder(target) as tmp:
        _folder_with(tmp, "old")
    real_replace = os.replace

    def failing_replace(src, dst):
        if ".tmp-" in str(src):  # the new folder being renamed in
            raise OSError(errno.EIO, "Input/output error", str(src))
        return real_replace(src, dst)

    def failing_exchange(a, b):
        raise OSError(errno.EIO, "Input/output error", str(a))

    if exchange:
        monkeypatch.setattr(atomic, "_exchange", failing_exchange, raising=False)
    else:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False, raising=False)
        monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(OSError, match="Input/output"), atomic_folder(target, replace=True) as tmp:
        _folder_with(tmp, "new")
    monkeypatch.undo()
    assert _content(target) == ("old", "old")
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "rename-aside"])
def test_folder_replace_when_deleting_old_fails_keeps_new(tmp_path, monkeypatch, caplog, exchange):
    target = tmp_path / "ckpt"
    with atomic_folder(target) as tmp:
        _folder_with(tmp, "old")
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)

    def failing_rmtree(path, *a, **kw):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(atomic.shutil, "rmtree", failing_rmtree)
    with (
        caplog.at_level(logging.WARNING, logger="wsi_llava.atomic"),
        atomic_folder(target, replace=True) as tmp,
    ):
        _folder_with(tmp, "new")
    monkeypatch.undo()
    assert _content(target) == ("new", "new")
    assert "previous copy could not be removed" in caplog.text


def test_folder_replace_succeeds_cleanly_with_umask_mode(tmp_path, umask):
    umask(0o022)
    target = tmp_path / "ckpt"
    with atomic_folder(target) as tmp:
        _folder_with(tmp, "old")
    assert _mode(target) == 0o755  # not mkdtemp's 0700
    target.chmod(0o750)
    with atomic_folder(target, replace=True) as tmp:
        _folder_with(tmp, "new")
    assert _content(target) == ("new", "new") and _mode(target) == 0o750
    assert _leftovers(tmp_path) == []
    with pytest.raises(FileExistsError), atomic_folder(target):
        pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError), atomic_folder(tmp_path / "file", replace=True):
        pass
    assert (tmp_path / "file").read_text() == "x" and _leftovers(tmp_path) == []


def test_publish_folder_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    """A folder filled elsewhere (training checkpoints written by every rank) replaces the old one."""
    from wsi_llava import atomic

    target = tmp_path / "step_0000010"
    target.mkdir()
    (target / "state.pt").write_text("old")
    filled = tmp_path / "step_0000010.tmp"
    filled.mkdir()
    (filled / "state.pt").write_text("new")
    atomic.publish_folder(filled, target)
    assert (target / "state.pt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000010"]

    again = tmp_path / "again.tmp"
    again.mkdir()
    (again / "state.pt").write_text("newer")

    def broken(a, b):
        raise OSError(5, "I/O error")

    monkeypatch.setattr(atomic, "_exchange", broken)
    with pytest.raises(OSError):
        atomic.publish_folder(again, target)
    assert (target / "state.pt").read_text() == "new"  # the old checkpoint is still whole
