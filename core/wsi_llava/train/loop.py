"""The training loop shared by the three stages: data parallel, accumulation, resumable checkpoints, logs.

Data parallelism runs under ``torchrun`` or ``accelerate launch`` (both set ``RANK``/``WORLD_SIZE``):
each rank takes every world-th sample of a global batch, losses are sums divided by the *global*
normaliser (answer tokens of the whole global batch), and gradients are summed across ranks, so one
GPU and several GPUs at the same global batch follow the same loss curve.

A resumable checkpoint (``checkpoints/step_NNNNNNN/state.pt``) holds the trainable weights, the
optimizer and scheduler state and every RNG state; ``--resume`` continues from the newest one and
replays the same batches (their order is a function of seed and epoch).

With ``train.strategy: fsdp`` (stages 2 and 3, see ``sharding``) the stage hands the loop its FSDP
root as ``Task.fsdp``: gradients are then reduce-scattered by FSDP, and the trainable weights and
optimizer state of a checkpoint go to ``step_NNNNNNN/dcp/`` (sharded, one file per rank) while
``state.pt`` keeps the step, scheduler and RNG states.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import logging
import math
import os
import pickle
import random
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
import torch.distributed as dist

from wsi_llava.atomic import publish_folder
from wsi_llava.train.config import LoopConfig, OptimConfig, TrainError
from wsi_llava.train.data import iter_steps, shard, total_steps

logger = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
STATE_FILE = "state.pt"
LOG_FILE = "log.jsonl"


@dataclass
class Dist:
    """This process's place in a data-parallel run (world 1 when not launched distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_dist(device: str | None = None) -> Dist:
    """Join the process group when ``WORLD_SIZE`` > 1 (torchrun / accelerate launch); pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank=rank, world=world, local_rank=local, device=dev)


def close_dist(d: Dist, wait: bool = True) -> None:
    """Leave the process group ``init_dist`` joined (after a barrier when ``wait``): a gloo group left to
    interpreter shutdown can abort the process (``terminate called without an active exception``)."""
    if d.world > 1 and dist.is_initialized():
        try:
            if wait:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def all_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum ``x`` over ranks (identity on one process)."""
    if d.world > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def lr_lambda(step: int, total: int, warmup_ratio: float, kind: str) -> float:
    """Linear warm-up for ``ceil(total * warmup_ratio)`` steps, then cosine to 0 (or constant)."""
    warm = math.ceil(total * warmup_ratio)
    if step < warm:
        return (step + 1) / warm
    if kind == "constant":
        return 1.0
    progress = (step - warm) / max(1, total - warm)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def rng_state() -> dict[str, Any]:
    """Every RNG state as tensors and plain values only, so a checkpoint loads with ``weights_only=True``."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["name"],
            npy["keys"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        )
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_state(path: Path) -> dict[str, Any]:
    """A checkpoint's ``state.pt`` read with ``weights_only=True``: tensors and plain values, never code.

    A pickle that names any other Python object (which could run code while loading) is refused.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found is None:
            raise TrainError(
                f"{path}: cannot read the checkpoint (damaged, or not written by wsi-llava train); not loaded"
            ) from None
        raise TrainError(
            f"{path}: refused to load: it holds Python objects other than tensors and plain values "
            f"(it asks for {found.group(1)}), and loading those can run code. Resume only from checkpoints "
            "written by this version of wsi-llava train; otherwise start without --resume in another --out"
        ) from None
    except (OSError, RuntimeError, EOFError) as e:
        raise TrainError(f"{path}: cannot read the checkpoint ({e}); not loaded") from None
    if not isinstance(state, dict) or "step" not in state:
        raise TrainError(f"{path}: not a wsi-llava training checkpoint (no 'step')")
    return state


class _MetadataUnpickler(pickle.Unpickler):
    """Reads a DCP ``.metadata`` pickle with only the types it is made of; any other global is refused."""

    _PLAIN = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath")}
    _MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._PLAIN:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module in self._MODULES:
            obj = super().find_class(module, name)
            if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                return obj  # plain records (fields only) and enums: nothing that runs code
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not part of a checkpoint's metadata")


def check_dcp_metadata(path: Path) -> None:
    """Refuse a sharded checkpoint whose ``.metadata`` pickle names anything but DCP's own records.

    ``torch.distributed.checkpoint`` reads that file with plain ``pickle``, so it is read here first
    with an allowlist, before DCP loads it.
    """
    try:
        with Path(path).open("rb") as fh:
            _MetadataUnpickler(fh).load()
    except FileNotFoundError:
        raise TrainError(f"{path}: missing; the sharded checkpoint is incomplete") from None
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found is None:
            raise TrainError(f"{path}: cannot read the checkpoint metadata ({e}); not loaded") from None
        raise TrainError(
            f"{path}: refused to load: it asks for {found.group(1)}, which is not part of a checkpoint's "
            "metadata, and loading it could run code. Resume only from checkpoints written by wsi-llava train"
        ) from None
    except (EOFError, AttributeError, ImportError, TypeError, ValueError) as e:
        raise TrainError(f"{path}: cannot read the checkpoint metadata ({e}); not loaded") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def list_checkpoints(out: Path) -> list[Path]:
    """Complete resumable checkpoints under ``out``, oldest first."""
    root = out / CKPT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step_") and (p / STATE_FILE).is_file())


class JsonlLog:
    """Appends one JSON object per line (rank 0 only); mirrors scalars to TensorBoard when installed."""

    def __init__(self, path: Path, enabled: bool, fresh: bool) -> None:
        self.path = path
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if fresh and path.exists():
            path.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(path.parent / "tensorboard"))
        except Exception:  # noqa: BLE001 - tensorboard is optional
            self.tb = None

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.tb is not None and "step" in row:
            for k, v in row.items():
                if isinstance(v, int | float) and k != "step":
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_log(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``log.jsonl`` (training rows have ``step`` and ``loss``)."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


@dataclass
class Task:
    """What a stage plugs into the loop.

    ``count(micro)``: the loss normaliser contribution of a micro-batch (answer tokens, or 1);
    ``loss_sum(micro)``: the summed loss of a micro-batch (a scalar with gradients).
    """

    stage: str
    lengths: list[int]
    trainable: dict[str, torch.nn.Parameter]
    param_groups: list[dict[str, Any]]
    count: Callable[[list[int]], float]
    loss_sum: Callable[[list[int]], torch.Tensor]
    autocast: Callable[[], Any]
    train_mode: Callable[[], None] = lambda: None
    fsdp: Any = None  # the FSDP root module (``sharding.LmParts``) under train.strategy fsdp


class RunArgs(TypedDict, total=False):
    """How a stage runs: the keyword arguments every ``run_*`` stage passes on to :func:`train_loop`."""

    resume: bool
    stop_after: int | None
    config_path: str | None


def autocast_for(loop: LoopConfig, d: Dist) -> Callable[[], Any]:
    """The task's autocast factory: bf16 on CUDA when ``train.bf16`` is on, else none."""
    if loop.bf16 and d.device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def _oom_message(stage: str, loop: LoopConfig, config_path: str | None, step: int) -> str:
    where = f" in {config_path}" if config_path else ""
    return (
        f"{stage}: out of GPU memory at step {step} with train.batch_size={loop.batch_size} per device. "
        f"Lower train.batch_size{where} (and raise train.grad_accum to keep the effective batch "
        f"{loop.batch_size} x {loop.grad_accum} x GPUs), or set train.grad_checkpointing: true"
    )


def train_loop(
    task: Task,
    loop: LoopConfig,
    optim: OptimConfig,
    out: Path,
    d: Dist,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    config_path: str | None = None,
) -> dict[str, Any]:
    """Run (or resume) the optimisation; returns ``{"steps", "last_loss", "stopped_early"}``."""
    out = Path(out)
    if loop.strategy == "fsdp" and task.fsdp is None:
        raise TrainError(
            f"{task.stage}: train.strategy fsdp shards the LLM of stage2 and stage3 only; "
            "use train.strategy: ddp here"
        )
    global_batch = loop.batch_size * loop.grad_accum * d.world
    n_steps = total_steps(len(task.lengths), global_batch, loop.epochs, loop.max_steps)
    params = list(task.trainable.values())
    opt = torch.optim.AdamW(task.param_groups, betas=optim.betas, weight_decay=optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_lambda(s, n_steps, optim.warmup_ratio, optim.scheduler)
    )
    existing = list_checkpoints(out)
    start = 0
    if resume and existing:
        ck = existing[-1]
        state = load_state(ck / STATE_FILE)
        saved_with = state.get("strategy", "ddp")
        if saved_with != loop.strategy:
            raise TrainError(
                f"{ck}: saved with train.strategy {saved_with}, now {loop.strategy}; resume with {saved_with}"
            )
        if task.fsdp is not None:
            from wsi_llava.train.sharding import DCP_DIR, load_sharded

            check_dcp_metadata(ck / DCP_DIR / ".metadata")
            load_sharded(ck, task.fsdp, opt)
        else:
            missing = set(task.trainable) - set(state["params"])
            if missing:
                raise TrainError(
                    f"{ck}: checkpoint lacks trainable weights {sorted(missing)[:5]} (another config?)"
                )
            with torch.no_grad():
                for k, p in task.trainable.items():
                    p.copy_(state["params"][k].to(p.device, p.dtype))
            opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"][min(d.rank, len(state["rng"]) - 1)])
        start = int(state["step"])
        if int(state.get("global_batch", global_batch)) != global_batch:
            raise TrainError(
                f"{ck}: saved with global batch {state['global_batch']}, now {global_batch}; "
                "resume with the same batch_size x grad_accum x GPUs"
            )
        logger.info("resuming %s from %s (step %d of %d)", task.stage, ck, start, n_steps)
    elif existing and not resume:
        raise TrainError(
            f"{out}: holds checkpoints of an earlier run; pass --resume, or choose another --out"
        )
    log = JsonlLog(out / LOG_FILE, d.main, fresh=start == 0)
    if start == 0:
        log.write(
            {
                "event": "start",
                "stage": task.stage,
                "steps": n_steps,
                "samples": len(task.lengths),
                "global_batch": global_batch,
                "world_size": d.world,
            }
        )
    from tqdm import tqdm

    bar = tqdm(total=n_steps, initial=start, desc=task.stage, disable=None if d.main else True)
    last_loss = float("nan")
    stopped = False
    step = start
    t0 = time.perf_counter()
    for step, epoch, batch in iter_steps(
        task.lengths, global_batch, loop.seed, start, n_steps, loop.group_by_length
    ):
        task.train_mode()
        micros = shard(batch, d.rank, d.world, loop.batch_size)
        norm = all_sum(
            torch.tensor([sum(task.count(m) for m in micros)], device=d.device, dtype=torch.float64), d
        )
        norm_f = float(norm.item())
        if norm_f <= 0:
            raise TrainError(f"{task.stage}: step {step + 1} has no answer tokens to learn from")
        total = torch.zeros(1, device=d.device, dtype=torch.float64)
        opt.zero_grad(set_to_none=True)
        try:
            for m in micros:
                with task.autocast():
                    ls = task.loss_sum(m)
                (ls.float() * (d.world / norm_f)).backward()
                total += ls.detach().double()
        except torch.OutOfMemoryError:
            raise TrainError(_oom_message(task.stage, loop, config_path, step + 1)) from None
        loss = float(all_sum(total, d).item()) / norm_f
        if not math.isfinite(loss):
            good = list_checkpoints(out)
            keep = (
                f"the last good checkpoint is {good[-1]} (continue with --resume)"
                if good
                else "no checkpoint was saved yet"
            )
            raise TrainError(
                f"{task.stage}: loss is {loss} at step {step + 1}; stopped without updating the weights; "
                f"{keep}. Try a lower optim.lr or train.bf16: false"
            )
        if d.world > 1 and task.fsdp is None:  # FSDP reduce-scatters the gradients itself
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            for p in params:
                p.grad.div_(d.world)
        gnorm = None
        if optim.max_grad_norm is not None:
            g = torch.nn.utils.clip_grad_norm_(params, optim.max_grad_norm)
            gnorm = float(g.full_tensor() if hasattr(g, "full_tensor") else g)  # a DTensor under fsdp
        opt.step()
        lr = sched.get_last_lr()[0]
        sched.step()
        last_loss = loss
        done = step + 1
        if done % loop.log_every == 0 or done == n_steps:
            row = {
                "step": done,
                "epoch": epoch,
                "loss": loss,
                "lr": lr,
                "time": round(time.perf_counter() - t0, 3),
            }
            if gnorm is not None:
                row["grad_norm"] = gnorm
            log.write(row)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if done % loop.save_every == 0 and done < n_steps:
            _save_state(out, task, opt, sched, done, global_batch, d, loop)
        if stop_after is not None and done >= stop_after and done < n_steps:
            stopped = True
            break
    bar.close()
    log.write({"event": "stopped" if stopped else "end", "step": step + 1, "loss": last_loss})
    log.close()
    return {"steps": n_steps, "last_loss": last_loss, "stopped_early": stopped}


def _save_state(
    out: Path, task: Task, opt: Any, sched: Any, step: int, global_batch: int, d: Dist, loop: LoopConfig
) -> None:
    """Write ``step_NNNNNNN`` via a ``.tmp`` folder renamed when complete (a kill leaves no half checkpoint)."""
    rngs: list[Any] = [rng_state()]
    if d.world > 1:
        gathered: list[Any] = [None] * d.world
        dist.all_gather_object(gathered, rngs[0])
        rngs = gathered
    folder = out / CKPT_DIR / f"step_{step:07d}"
    tmp = folder.with_name(folder.name + ".tmp")
    if d.main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    state: dict[str, Any] = {
        "step": step,
        "stage": task.stage,
        "global_batch": global_batch,
        "strategy": loop.strategy,
        "scheduler": sched.state_dict(),
        "rng": rngs,
    }
    if task.fsdp is not None:
        from wsi_llava.train.sharding import save_sharded

        barrier(d)
        save_sharded(tmp, task.fsdp, opt)  # every rank writes its shard
    else:
        state["params"] = {k: p.detach().cpu() for k, p in task.trainable.items()}
        state["optimizer"] = opt.state_dict()
    if d.main:
        torch.save(state, tmp / STATE_FILE)
        publish_folder(tmp, folder)  # a crash leaves the old checkpoint or the new one, never neither
        for old in list_checkpoints(out)[: -loop.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(d)


def named_trainable(modules: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    """``prefix.name -> parameter`` for every parameter that requires grad."""
    out: dict[str, torch.nn.Parameter] = {}
    for prefix, mod in modules.items():
        for n, p in mod.named_parameters():
            if p.requires_grad:
                out[f"{prefix}.{n}"] = p
    return out


def count_params(params: Sequence[torch.nn.Parameter]) -> int:
    return sum(p.numel() for p in params)
