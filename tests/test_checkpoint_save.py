"""``save_checkpoint`` over an existing checkpoint: a complete one is under the name whatever fails.

Each failure is injected at the step it names; afterwards the folder must load, with the old
weights (the new ones never made it) or the new ones (only the clean-up failed).
"""

from __future__ import annotations

import errno
import os

import pytest
import torch
from kits.llm import make_tiny_wsi_llava

from wsi_llava import atomic
from wsi_llava.errors import ModelError
from wsi_llava.model.checkpoint import load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def models(tiny_llm_dir):  # noqa: F811
    """Two tiny models that differ in their projector weights."""
    return make_tiny_wsi_llava(tiny_llm_dir, seed=0), make_tiny_wsi_llava(tiny_llm_dir, seed=1)


def _projector_of(folder) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_checkpoint(folder).projector.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: torch.nn.Module) -> bool:
    return all(torch.equal(a[k], v) for k, v in b.state_dict().items())


def _no_leftovers(folder) -> None:
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "rename-aside"])
def test_failed_rename_in_keeps_the_old_checkpoint(models, tmp_path, monkeypatch, exchange):
    old, new = models
    folder = save_checkpoint(old, tmp_path / "ckpt")
    real_replace = os.replace

    def failing_replace(src, dst):
        if ".tmp-" in str(src):  # the new checkpoint's folder being renamed into place
            raise OSError(errno.EIO, "Input/output error", str(src))
        return real_replace(src, dst)

    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False, raising=False)
    else:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: failing_replace(str(a), str(b)), raising=False)
    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="Input/output"):
        save_checkpoint(new, folder)
    monkeypatch.undo()
    assert _same(_projector_of(folder), old.projector)
    _no_leftovers(folder)


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "rename-aside"])
def test_failed_delete_of_the_old_copy_keeps_the_new_checkpoint(models, tmp_path, monkeypatch, exchange):
    old, new = models
    folder = save_checkpoint(old, tmp_path / "ckpt")
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False, raising=False)

    def failing_rmtree(path, *a, **kw):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(atomic.shutil, "rmtree", failing_rmtree)
    save_checkpoint(new, folder)
    monkeypatch.undo()
    assert _same(_projector_of(folder), new.projector)


def test_failure_while_writing_keeps_old_and_leaves_nothing(models, tmp_path, monkeypatch):
    old, new = models
    folder = save_checkpoint(old, tmp_path / "ckpt")
    save_checkpoint(new, folder)  # a clean replace
    assert _same(_projector_of(folder), new.projector)
    _no_leftovers(folder)

    def disk_full(self, folder):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(new.spec), "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(old, folder)
    monkeypatch.undo()
    assert _same(_projector_of(folder), new.projector)
    _no_leftovers(folder)
    with pytest.raises(ModelError, match="already exists"):
        save_checkpoint(old, folder, overwrite=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelError, match="not a folder"):
        save_checkpoint(old, tmp_path / "file")
