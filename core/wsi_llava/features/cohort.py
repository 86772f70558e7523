"""Cohort featurization: many slides into one :class:`FeatureCache`, spread over processes / GPUs.

Launched as one process it does every slide in list order; under ``torchrun`` (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``) the ranks claim slides one at a time from a shared queue, largest first (tile cells from
the slide headers), through an atomic counter in the process group's store, so a rank that finishes early
takes more and no rank waits on a fixed share. Each rank encodes on ``cuda:LOCAL_RANK``. Every slide is
extracted by exactly one rank with :func:`~wsi_llava.features.extract.extract_features`, so the cache
entries are the same as a one-process run's. A slide that fails is reported by name and skipped.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from wsi_llava.errors import Cancelled, WsiLlavaError
from wsi_llava.progress import CancelToken, ProgressCallback, no_progress

logger = logging.getLogger(__name__)

__all__ = [
    "CohortReport",
    "DistEnv",
    "RankTiming",
    "SlideOutcome",
    "claim_order",
    "device_for_rank",
    "estimate_tiles",
    "extract_cohort",
    "list_slides",
]


# --------------------------------------------------------------------------------------------------------
# which process am I
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistEnv:
    """This process's place in a ``torchrun`` launch (rank 0 of 1 when launched alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DistEnv:
        """Read ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (as torchrun sets them); absent means 0 of 1."""
        env = os.environ if env is None else env
        values = {}
        for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", None)):
            raw = env.get(name)
            if raw is None or raw == "":
                values[name] = default
                continue
            try:
                values[name] = int(raw)
            except ValueError:
                raise WsiLlavaError(f"environment variable {name}={raw!r} must be an integer") from None
        rank, world = values["RANK"], values["WORLD_SIZE"]
        local = values["LOCAL_RANK"] if values["LOCAL_RANK"] is not None else rank
        if world < 1 or not 0 <= rank < world or local < 0:
            raise WsiLlavaError(
                f"environment variables RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}: "
                "expected 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0"
            )
        return cls(rank=rank, world_size=world, local_rank=local)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def device_for_rank(device: str, env: DistEnv) -> str:
    """``auto``/``cuda`` → ``cuda:LOCAL_RANK`` (when CUDA is there), an explicit ``cuda:N`` or ``cpu`` as given."""
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        import torch

        n = torch.cuda.device_count()
        if n == 0:
            raise WsiLlavaError("--device cuda: no CUDA device is available")
        if env.local_rank >= n:
            raise WsiLlavaError(f"LOCAL_RANK {env.local_rank} has no GPU: this machine has {n}")
        return f"cuda:{env.local_rank}"
    return device


# --------------------------------------------------------------------------------------------------------
# which slides
# --------------------------------------------------------------------------------------------------------
def _is_slide_file(path: Path) -> bool:
    from wsi_llava.slide.open import candidate_readers

    return path.is_file() and not path.name.startswith(".") and bool(candidate_readers(path))


def _read_list_file(path: Path) -> list[Path]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WsiLlavaError(f"{path}: cannot read the slide list ({exc})") from exc
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        p = Path(line).expanduser()
        out.append(p if p.is_absolute() else path.parent / p)  # relative to the list file
    return out


def list_slides(inputs: Iterable[str | Path], list_file: str | Path | None = None) -> list[Path]:
    """Slides named by ``inputs`` (files, or folders: their slide files, sorted) and ``list_file``.

    ``list_file`` holds one path a line (``#`` comments; relative paths are relative to the file). Order
    is kept, duplicates (same resolved path) are dropped. Paths are not opened here: a missing or corrupt
    slide is reported when it is extracted, without stopping the others.
    """
    raw: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir() and not _accepts_directory(p):
            found = sorted(q for q in p.iterdir() if _is_slide_file(q))
            if not found:
                raise WsiLlavaError(f"{p}: folder holds no slide files")
            raw.extend(found)
        else:
            raw.append(p)
    if list_file is not None:
        lf = Path(list_file).expanduser()
        if not lf.is_file():
            raise WsiLlavaError(f"{lf}: slide list file not found")
        listed = _read_list_file(lf)
        if not listed:
            raise WsiLlavaError(f"{lf}: slide list is empty")
        raw.extend(listed)
    seen: set[str] = set()
    out = []
    for p in raw:
        key = str(p.resolve()) if p.exists() else str(p.absolute())
        if key in seen:
            logger.info("%s is listed twice; extracting it once", p)
            continue
        seen.add(key)
        out.append(p)
    return out


def _accepts_directory(path: Path) -> bool:
    """A folder that a registered reader opens as one slide (a suffix it claims, e.g. ``.zarr``)."""
    from wsi_llava.plugins import slide_readers
    from wsi_llava.slide.open import candidate_readers

    registry = slide_readers()
    return any(registry[n].meta.get("accepts_directories") for n in candidate_readers(path))


# --------------------------------------------------------------------------------------------------------
# claiming
# --------------------------------------------------------------------------------------------------------
def estimate_tiles(path: str | Path, tile_size: int, target_mpp: float, mpp: float | None = None) -> int:
    """Tile-grid cells of a slide from its header (an upper bound of its tissue tiles); 0 if unreadable.

    Cheap (no pixels are read); it orders the claim queue, largest slides first.
    """
    from wsi_llava.slide import open_slide

    try:
        with open_slide(path, mpp=mpp) as reader:
            w0, h0 = reader.dimensions
            t0 = max(1, round(tile_size * target_mpp / reader.mpp))
    except Exception as exc:  # noqa: BLE001 - the rank that claims the slide reports it properly
        logger.debug("cannot size %s for the claim queue (%s)", path, exc)
        return 0
    return int(-(-w0 // t0) * -(-h0 // t0))


def claim_order(weights: Sequence[float]) -> list[int]:
    """Indices of ``weights``, largest first (ties: lower index first): the order slides are claimed in.

    Largest first keeps the tail short: the last slides handed out are the smallest, so ranks finish close
    together whatever their speed.
    """
    return sorted(range(len(weights)), key=lambda i: (-float(weights[i]), i))


#: distinguishes the store keys of successive cohort runs in one process group (every rank counts alike)
_RUNS = itertools.count()


class _SlideQueue:
    """Slide indices handed out one at a time in ``order``: from an atomic counter in ``store`` (shared by
    all ranks; ``add`` returns the new value, so each position goes to exactly one caller), else locally.
    """

    def __init__(self, order: Sequence[int], store: Any | None = None) -> None:
        self.order = list(order)
        self._store = store
        self._prefix = f"wsi_llava/cohort/{next(_RUNS)}/" if store is not None else ""
        self._claimed = 0
        self._done = 0

    def claim(self) -> int | None:
        """The next unclaimed slide's index, or None when every slide has been claimed."""
        if self._store is None:
            pos, self._claimed = self._claimed, self._claimed + 1
        else:
            pos = int(self._store.add(self._prefix + "claimed", 1)) - 1
        return self.order[pos] if pos < len(self.order) else None

    def finished_one(self) -> int:
        """Count one more finished slide; returns how many the whole cohort has finished."""
        if self._store is None:
            self._done += 1
            return self._done
        return int(self._store.add(self._prefix + "done", 1))


def _default_store() -> Any:
    """The store of the default process group: every rank reaches it, and its ``add`` is atomic.

    torch has no public getter for it; a second ``TCPStore`` would need a port and an address that every
    rank can reach, which the group's store already has.
    """
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


# --------------------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------------------
class SlideOutcome(BaseModel):
    """What happened to one slide."""

    path: str
    index: int = Field(description="position in the cohort's slide list")
    rank: int
    ok: bool
    n_tiles: int = 0
    dim: int = 0
    cache_path: str | None = None
    from_cache: bool = False
    seconds: float = 0.0
    error: str | None = None


class RankTiming(BaseModel):
    """One rank's extraction loop: its wall-clock span (``time.time()``, seconds since the epoch, from
    after every rank's set-up to its last slide's end), the slides it claimed, and its one-time costs.
    """

    rank: int
    device: str
    start: float
    end: float
    n_slides: int
    n_tiles: int = Field(description="tiles this rank encoded (cache hits not counted)")
    slides: list[int] = Field(default_factory=list, description="cohort indices claimed, in claim order")
    warmup_s: float = Field(0.0, description="encoder warm-up (CUDA: torch.compile + one blank batch)")
    sizing_s: float = Field(0.0, description="this rank's part of reading slide headers for the queue")


class CohortReport(BaseModel):
    """Outcomes of a cohort run, in slide-list order, every rank's (gathered on every rank)."""

    world_size: int
    rank: int
    encoder_id: str
    outcomes: list[SlideOutcome]
    timings: list[RankTiming]

    @property
    def failed(self) -> list[SlideOutcome]:
        return [o for o in self.outcomes if not o.ok]

    @property
    def succeeded(self) -> list[SlideOutcome]:
        return [o for o in self.outcomes if o.ok]

    @property
    def wall_seconds(self) -> float:
        """From the first rank's start to the last rank's end."""
        if not self.timings:
            return 0.0
        return max(t.end for t in self.timings) - min(t.start for t in self.timings)

    def error_summary(self, limit: int = 5) -> str:
        """One line naming the failed slides and why (the first ``limit``)."""
        bad = self.failed
        parts = [f"{o.path}: {o.error}" for o in bad[:limit]]
        more = f"; and {len(bad) - limit} more" if len(bad) > limit else ""
        return f"{len(bad)} of {len(self.outcomes)} slides failed: " + "; ".join(parts) + more


# --------------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------------
def _describe(exc: BaseException, path: Path) -> str:
    msg = str(exc).strip() or type(exc).__name__
    if not isinstance(exc, WsiLlavaError):
        msg = f"{type(exc).__name__}: {msg}"
    prefix = f"{path}: "
    return msg[len(prefix) :] if msg.startswith(prefix) else msg


#: on CUDA every batch of every slide goes through the compiled encoder (compiled before the first batch,
#: never a background compile that lets the first batches run eagerly): features are then the same
#: whichever rank and whichever moment encodes a slide
_COMPILE = True


@dataclass(frozen=True)
class _Job:
    """What every slide of one rank's run shares: the encoder, the cache, the device and the tiling."""

    encoder: Any
    cache: Any
    device: str
    target_mpp: float
    tile_size: int
    mpp: float | None
    batch_size: int | None
    workers: int
    cancel: CancelToken | None


def _extract_one(path: Path, index: int, rank: int, job: _Job, progress: ProgressCallback) -> SlideOutcome:
    from wsi_llava.features.extract import cache_key_for, extract_features
    from wsi_llava.slide import open_slide
    from wsi_llava.slide.tiling import make_tile_grid

    t0 = time.perf_counter()
    key = None
    cache = job.cache

    def cached(feats: Any, from_cache: bool) -> SlideOutcome:
        return SlideOutcome(
            path=str(path),
            index=index,
            rank=rank,
            ok=True,
            n_tiles=feats.n_tiles,
            dim=feats.dim,
            cache_path=str(feats.path) if feats.path is not None else None,
            from_cache=from_cache,
            seconds=time.perf_counter() - t0,
        )

    try:
        with open_slide(path, mpp=job.mpp) as reader:
            grid = make_tile_grid(reader, target_mpp=job.target_mpp, tile_size=job.tile_size)
            key = cache_key_for(reader, grid, job.encoder)
            feats = extract_features(
                reader,
                grid,
                job.encoder,
                cache,
                device=job.device,
                batch_size=job.batch_size,
                progress=progress,
                cancel=job.cancel,
                workers=job.workers,
                compile=_COMPILE if job.device.startswith("cuda") else None,
            )
        return cached(
            feats, not feats.encoded
        )  # from the cache also when another process encoded it meanwhile
    except Cancelled:
        raise
    except Exception as exc:  # noqa: BLE001 - one bad slide must not stop the cohort
        done = cache.get(key) if key is not None else None
        if done is not None:  # another process finished the same entry (same file under two names)
            logger.info("%s: cached concurrently by another process (%s)", path, exc)
            return cached(done, True)
        msg = _describe(exc, path)
        logger.error("rank %d: %s: %s", rank, path, msg)
        logger.debug("traceback of the failure on %s", path, exc_info=True)
        return SlideOutcome(
            path=str(path), index=index, rank=rank, ok=False, error=msg, seconds=time.perf_counter() - t0
        )


def _process_group(env: DistEnv) -> bool:
    """Join the process group (or create a gloo one from torchrun's environment) → whether created here."""
    if not env.distributed:
        return False
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if (dist.get_rank(), dist.get_world_size()) != (env.rank, env.world_size):
            raise WsiLlavaError(
                f"RANK={env.rank}, WORLD_SIZE={env.world_size} differ from the initialised process group "
                f"(rank {dist.get_rank()} of {dist.get_world_size()})"
            )
        return False
    if not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
        raise WsiLlavaError(
            f"WORLD_SIZE={env.world_size}: the ranks share out the slides through a process group, which "
            "needs MASTER_ADDR and MASTER_PORT (launch with torchrun)"
        )
    dist.init_process_group("gloo", rank=env.rank, world_size=env.world_size)
    return True


def _warm_up(encoder: Any, dev: str, batch_size: int | None, tile_size: int) -> float:
    """Compile and run the CUDA fast-path encoder once on blank tiles, outside the timed span → seconds.

    Uses the same cached wrapper and batch shape as :func:`extract_features`, so the first slide neither
    compiles nor recompiles. A failure is logged; the slides then report what goes wrong.
    """
    if not dev.startswith("cuda"):
        return 0.0
    import torch

    from wsi_llava.features.fast import fast_encoder

    t0 = time.perf_counter()
    try:
        fenc = fast_encoder(encoder, dev, compile=_COMPILE)
        blank = torch.zeros((batch_size or 256, tile_size, tile_size, 3), dtype=torch.uint8, device=dev)
        with torch.inference_mode():
            fenc(blank)
        torch.cuda.synchronize(dev)
    except Exception as exc:  # noqa: BLE001 - the slides' own runs report the problem by name
        logger.warning("warming up tile encoder on %s failed: %s", dev, exc)
    return time.perf_counter() - t0


def extract_cohort(
    slides: Sequence[str | Path],
    encoder: Any,
    cache: Any,
    *,
    env: DistEnv | None = None,
    device: str = "auto",
    target_mpp: float = 0.5,
    tile_size: int = 256,
    mpp: float | None = None,
    batch_size: int | None = None,
    workers: int = 2,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> CohortReport:
    """Extract features of ``slides`` into ``cache``: all of them alone, the slides this rank claims under
    torchrun (every rank returns the whole cohort's report).

    ``encoder`` is a built tile encoder; it is moved to ``cuda:LOCAL_RANK`` (``device`` ``auto``/``cuda``)
    and, on CUDA, warmed up (compiled) before the first slide. With ``WORLD_SIZE`` > 1 the ranks join the
    process group (a gloo one is created from torchrun's environment if none is initialised) and claim
    slides, largest first, from a counter in its store. Failed slides are logged and listed in the report,
    never raised; ``cancel`` raises ``Cancelled``. ``progress`` gets ``(slides finished by all ranks,
    slides, "rank r/N: slides")`` and each slide's tile progress under ``"rank r/N: <file name>"``.
    """
    env = env or DistEnv.from_env()
    progress = progress or no_progress
    paths = [Path(p) for p in slides]
    if not paths:
        raise WsiLlavaError("no slides to extract")
    dev = device_for_rank(device, env)
    if dev.startswith("cuda"):
        import torch

        torch.cuda.set_device(torch.device(dev))
    created = _process_group(env)
    job = _Job(encoder, cache, dev, target_mpp, tile_size, mpp, batch_size, workers, cancel)
    try:
        return _run(paths, job, env, progress)
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _queue(
    paths: list[Path], env: DistEnv, tile_size: int, target_mpp: float, mpp: float | None
) -> _SlideQueue:
    """List order alone; under torchrun largest first (each rank sizes every N-th slide, all gathered)."""
    if not env.distributed:
        return _SlideQueue(range(len(paths)))
    import torch.distributed as dist

    mine = {
        i: estimate_tiles(paths[i], tile_size, target_mpp, mpp)
        for i in range(env.rank, len(paths), env.world_size)
    }
    parts: list[Any] = [None] * env.world_size
    dist.all_gather_object(parts, mine)
    weights = [0] * len(paths)
    for part in parts:
        for i, w in part.items():
            weights[int(i)] = int(w)
    logger.info(
        "rank %d/%d: %d slides, ~%d tile cells, claimed largest first",
        env.rank,
        env.world_size,
        len(paths),
        sum(weights),
    )
    return _SlideQueue(claim_order(weights), _default_store())


def _run(paths: list[Path], job: _Job, env: DistEnv, progress: ProgressCallback) -> CohortReport:
    tag = f"rank {env.rank}/{env.world_size}"
    dev, cancel = job.device, job.cancel
    warmup_s = _warm_up(job.encoder, dev, job.batch_size, job.tile_size)
    t0 = time.perf_counter()
    slide_queue = _queue(paths, env, job.tile_size, job.target_mpp, job.mpp)
    sizing_s = time.perf_counter() - t0
    if env.distributed:
        import torch.distributed as dist

        dist.barrier()  # the span starts once every rank is set up
    start = time.time()
    outcomes: list[SlideOutcome] = []
    claimed: list[int] = []
    finished = 0
    progress(0, len(paths), f"{tag}: slides")
    while True:
        if cancel is not None:
            cancel.raise_if_cancelled()
        i = slide_queue.claim()
        if i is None:
            break
        claimed.append(i)
        path = paths[i]
        name = f"{tag}: {path.name}"

        def on_tiles(d: int, total: int, _msg: str, _name: str = name) -> None:
            progress(d, total, _name)

        outcome = _extract_one(path, i, env.rank, job, on_tiles)
        if outcome.ok:
            logger.info(
                "%s: %s: %d tiles in %.1f s%s",
                tag,
                path,
                outcome.n_tiles,
                outcome.seconds,
                " (cached)" if outcome.from_cache else "",
            )
        outcomes.append(outcome)
        finished = min(slide_queue.finished_one(), len(paths))
        progress(finished, len(paths), f"{tag}: slides")
    if dev.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    timing = RankTiming(
        rank=env.rank,
        device=dev,
        start=start,
        end=time.time(),
        n_slides=len(claimed),
        n_tiles=sum(o.n_tiles for o in outcomes if o.ok and not o.from_cache),
        slides=claimed,
        warmup_s=round(warmup_s, 3),
        sizing_s=round(sizing_s, 3),
    )
    logger.info("%s: claimed %d slides %s", tag, len(claimed), claimed)
    timings = [timing]
    if env.distributed:
        import torch.distributed as dist

        parts: list[Any] = [None] * env.world_size
        dist.all_gather_object(parts, ([o.model_dump() for o in outcomes], timing.model_dump()))
        outcomes = [SlideOutcome(**o) for part in parts for o in part[0]]
        timings = [RankTiming(**part[1]) for part in parts]
    if finished < len(paths):  # the other ranks finished the rest
        progress(len(paths), len(paths), f"{tag}: slides")
    outcomes.sort(key=lambda o: o.index)
    return CohortReport(
        world_size=env.world_size,
        rank=env.rank,
        encoder_id=str(getattr(job.encoder, "encoder_id", "")),
        outcomes=outcomes,
        timings=timings,
    )
