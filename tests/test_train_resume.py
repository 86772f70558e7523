"""Resuming the training loop: the same curve after a stop, and a checkpoint that would run code is refused."""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_llava.train.config import LoopConfig, OptimConfig, TrainError
from wsi_llava.train.loop import (
    STATE_FILE,
    Dist,
    Task,
    list_checkpoints,
    read_log,
    seed_everything,
    train_loop,
)


def _task() -> Task:
    """A linear regression whose loss uses all three RNGs the checkpoint restores (torch, numpy, random)."""
    seed_everything(0)
    w = torch.nn.Parameter(torch.zeros(4))
    x = torch.randn(12, 4)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])

    def loss_sum(idx: list[int]) -> torch.Tensor:
        noise = torch.randn(len(idx)) * 0.01 + float(np.random.rand()) * 0.01 + random.random() * 0.01
        return ((x[idx] @ w - y[idx] + noise) ** 2).sum()

    return Task(
        stage="toy",
        lengths=[1] * 12,
        trainable={"w": w},
        param_groups=[{"params": [w], "lr": 0.05}],
        count=lambda idx: float(len(idx)),
        loss_sum=loss_sum,
        autocast=contextlib.nullcontext,
    )


LOOP = LoopConfig(epochs=3, batch_size=4, bf16=False, save_every=2, group_by_length=False)
OPTIM = OptimConfig(lr=0.05, warmup_ratio=0.0)


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_log(run / "log.jsonl") if "loss" in r and "event" not in r]


def test_stop_then_resume_follows_the_same_curve(tmp_path: Path) -> None:
    train_loop(_task(), LOOP, OPTIM, tmp_path / "full", Dist())
    full = _losses(tmp_path / "full")
    part = tmp_path / "part"
    res = train_loop(_task(), LOOP, OPTIM, part, Dist(), stop_after=4)
    assert res["stopped_early"] and [p.name for p in list_checkpoints(part)] == [
        "step_0000002",
        "step_0000004",
    ]
    # the state file holds tensors and plain values only: it loads with weights_only=True
    state = torch.load(list_checkpoints(part)[-1] / STATE_FILE, weights_only=True)
    assert state["step"] == 4 and isinstance(state["rng"][0]["numpy"]["keys"], torch.Tensor)
    # different RNG states now, restored from the checkpoint on resume
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    train_loop(_task(), LOOP, OPTIM, part, Dist(), resume=True)
    assert _losses(part) == pytest.approx(full, rel=1e-6)


class _RunsCode:
    """Unpickling this calls ``Path.touch(marker)``: what a malicious checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_loop(_task(), LOOP, OPTIM, run, Dist(), stop_after=2)
    ck = list_checkpoints(run)[-1]
    marker = tmp_path / "pwned"
    state = torch.load(ck / STATE_FILE, weights_only=True)
    state["scheduler"]["payload"] = _RunsCode(marker)
    torch.save(state, ck / STATE_FILE)
    assert not marker.exists()
    with pytest.raises(TrainError) as e:
        train_loop(_task(), LOOP, OPTIM, run, Dist(), resume=True)
    assert not marker.exists()
    msg = str(e.value)
    assert str(ck / STATE_FILE) in msg and "refused to load" in msg and "run code" in msg
    assert "it asks for getattr" in msg  # names what the pickle asked for (getattr(PosixPath, "touch"))


def test_an_unreadable_checkpoint_is_one_clear_error(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_loop(_task(), LOOP, OPTIM, run, Dist(), stop_after=2)
    ck = list_checkpoints(run)[-1]
    (ck / STATE_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(TrainError, match=r"state\.pt: cannot read the checkpoint"):
        train_loop(_task(), LOOP, OPTIM, run, Dist(), resume=True)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_sharded_checkpoint_whose_metadata_would_run_code_is_refused(tmp_path: Path) -> None:
    """DCP reads ``dcp/.metadata`` with plain pickle: resume reads it first, with an allowlist."""
    import pickle

    import torch.distributed.checkpoint as dcp

    from wsi_llava.train.loop import check_dcp_metadata

    real = tmp_path / "real"
    dcp.save({"w": torch.zeros(3), "optim": {"lr": 0.1, "step": 2}}, checkpoint_id=str(real))
    check_dcp_metadata(real / ".metadata")  # what DCP writes passes
    ck = tmp_path / "run" / "checkpoints" / "step_0000002"
    (ck / "dcp").mkdir(parents=True)
    torch.save(
        {"step": 2, "strategy": "fsdp", "global_batch": 4, "scheduler": {}, "rng": []}, ck / STATE_FILE
    )
    marker = tmp_path / "pwned"
    (ck / "dcp" / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    task = _task()
    task.fsdp = object()  # never reached: the metadata is refused first
    loop = LOOP.model_copy(update={"strategy": "fsdp"})
    with pytest.raises(TrainError) as e:
        train_loop(task, loop, OPTIM, tmp_path / "run", Dist(), resume=True)
    assert not marker.exists()
    assert ".metadata: refused to load: it asks for pathlib.Path.touch" in str(e.value)
