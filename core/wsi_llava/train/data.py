"""Training data: feature packs, samples, length-grouped batching and collation.

A *feature pack* (``wsi-llava train prepare``) is one ``torch.save`` file holding, per slide, the tile
features from the tile encoder (via the ``FeatureCache``), their level-0 coords and tile size, and the
bench questions about it, each with the tile indices it covers (all, or the tiles of its region box or
whole annotation, chosen by ``select_tiles`` exactly as ``SlideSession`` does at inference). Training
then needs no slide reader.

With ``data.bench`` + ``data.features`` the visual tokens are the official precomputed ``.pt`` tensors
(WSI-Bench, 576 x 1024), looked up by each row's ``image`` path; missing files are listed up front.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsi_llava.progress import ProgressCallback, no_progress
from wsi_llava.train.config import DataConfig, TrainError

logger = logging.getLogger(__name__)

PACK_VERSION = 1


@dataclass
class Sample:
    """One question-answer pair about a slide (or a region of it)."""

    slide: str
    task: str
    kind: str  # "open" | "close"
    question: str
    answer: str
    tiles: tuple[int, ...] | None = None  # tile indices (pack slides); None: all tiles / token file


@dataclass
class SlideFeatures:
    """Tile features of one slide (pack) or its precomputed visual tokens (official ``.pt``)."""

    features: Any  # torch.Tensor (N, D) tile features, or (n_tokens, in_dim) tokens
    coords: Any | None = None  # torch.LongTensor (N, 2); None for precomputed tokens
    tile_size_level0: int = 0

    @property
    def is_tokens(self) -> bool:
        return self.coords is None


# --- packs ----------------------------------------------------------------------------------------
def prepare_pack(
    benches: Iterable[str | Path],
    out: str | Path,
    *,
    tile_encoder: str = "demo-vit",
    weights: str | Path | None = None,
    target_mpp: float = 0.5,
    tile_size: int = 256,
    cache_dir: str | Path | None = None,
    device: str = "cpu",
    batch_size: int = 64,
    progress: ProgressCallback = no_progress,
) -> Path:
    """Extract (or reuse cached) tile features of every slide the benches ask about; write one pack.

    All slides are checked first: missing ones are listed together before any extraction starts.
    """
    import numpy as np
    import torch

    from wsi_llava.errors import RegionError
    from wsi_llava.eval.bench import ItemRegions, load_bench
    from wsi_llava.features.cache import FeatureCache
    from wsi_llava.features.extract import extract_features
    from wsi_llava.features.tile import build_tile_encoder
    from wsi_llava.settings import cache_dir as default_cache_dir
    from wsi_llava.slide import open_slide
    from wsi_llava.slide.tiling import make_tile_grid, select_tiles

    jobs: list[tuple[str, Path, list[Any], ItemRegions]] = []
    missing: list[str] = []
    for b in benches:
        bench = load_bench(b)
        root = bench.root or Path(b)
        regions = ItemRegions(bench.root)
        by_image: dict[str, list[Any]] = {}
        for it in bench.items:
            by_image.setdefault(it.image, []).append(it)
        for image, items in sorted(by_image.items()):
            path = root / image
            if not path.exists():
                missing.append(str(path))
            jobs.append((f"{Path(b).name}/{Path(image).stem}", path, items, regions))
    if missing:
        shown = "\n  ".join(missing[:20]) + (
            f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
        )
        raise TrainError(f"{len(missing)} slide(s) named by the bench are missing:\n  {shown}")
    encoder = build_tile_encoder(tile_encoder, weights=weights)
    cache = FeatureCache(default_cache_dir(cache_dir) / "features")
    slides: dict[str, dict[str, Any]] = {}
    samples: list[dict[str, Any]] = []
    skipped: list[str] = []
    for i, (key, path, items, regions) in enumerate(jobs):
        progress(i, len(jobs), "preparing features")
        reader = open_slide(path)
        try:
            grid = make_tile_grid(reader, target_mpp=target_mpp, tile_size=tile_size)
            feats = extract_features(reader, grid, encoder, cache, device=device, batch_size=batch_size)
            slides[key] = {
                "features": torch.from_numpy(np.asarray(feats.features, dtype=np.float32)).half(),
                "coords": torch.from_numpy(np.asarray(feats.coords, dtype=np.int64)),
                "tile_size_level0": int(grid.tile_size_level0),
            }
            for it in items:
                tiles = None
                region = regions.region(it)
                if region is not None:
                    try:
                        tiles = [int(t) for t in select_tiles(grid, region, source=it.source)]
                    except RegionError as e:
                        skipped.append(str(e))
                        continue
                samples.append(
                    {
                        "slide": key,
                        "task": it.task,
                        "kind": it.kind,
                        "question": it.question,
                        "answer": it.answer,
                        "tiles": tiles,
                    }
                )
        finally:
            reader.close()
    progress(len(jobs), len(jobs), "preparing features")
    if skipped:
        logger.warning(
            "%d region question(s) skipped (no tissue tile in the region), e.g. %s", len(skipped), skipped[0]
        )
    out = Path(out)
    payload = {
        "version": PACK_VERSION,
        "encoder_id": encoder.encoder_id,
        "tile_encoder": tile_encoder,
        "target_mpp": target_mpp,
        "tile_size": tile_size,
        "slides": slides,
        "samples": samples,
    }
    save_pack(payload, out)
    logger.info("wrote %s: %d slides, %d samples", out, len(slides), len(samples))
    return out


def save_pack(payload: dict[str, Any], out: Path) -> None:
    """Write a pack atomically (temp name, then rename): a killed run never leaves a half-written pack."""
    import torch

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(out)


def read_pack(path: Path, version: int, what: str) -> dict[str, Any]:
    """A pack of kind ``what`` (e.g. ``feature pack``) at ``version``; errors name the file."""
    import torch

    try:
        pack = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TrainError(f"{path}: cannot read the {what} ({e})") from None
    if not isinstance(pack, dict) or pack.get("version") != version:
        raise TrainError(f"{path}: not a wsi-llava {what} (version {version})")
    return pack


def load_pack(path: Path) -> dict[str, Any]:
    """A pack written by :func:`prepare_pack` (checked)."""
    return read_pack(path, PACK_VERSION, "feature pack")


# --- the sample table -----------------------------------------------------------------------------
@dataclass
class TrainData:
    """Samples plus the features they refer to."""

    samples: list[Sample]
    slides: dict[str, SlideFeatures]
    encoder_ids: set[str]

    def features_for(self, sample: Sample) -> SlideFeatures:
        return self.slides[sample.slide]


def _token_files(cfg: DataConfig) -> tuple[list[Sample], dict[str, SlideFeatures]]:
    import torch

    from wsi_llava.eval.bench import load_bench
    from wsi_llava.eval.runner import feature_path

    assert cfg.features is not None
    samples: list[Sample] = []
    paths: dict[str, Path] = {}
    missing: list[str] = []
    for b in cfg.bench:
        try:
            bench = load_bench(b)
        except Exception as e:  # noqa: BLE001 - the loader's message already names the file
            raise TrainError(str(e)) from None
        for it in bench.items:
            if it.image not in paths:
                try:
                    paths[it.image] = feature_path(cfg.features, it.image)
                except Exception:  # noqa: BLE001
                    missing.append(it.image)
                    paths[it.image] = cfg.features / it.image
            samples.append(Sample(it.image, it.task, it.kind, it.question, it.answer))
    if missing:
        uniq = sorted(set(missing))
        shown = "\n  ".join(uniq[:20]) + (f"\n  ... and {len(uniq) - 20} more" if len(uniq) > 20 else "")
        raise TrainError(f"data.features {cfg.features}: {len(uniq)} feature file(s) missing:\n  {shown}")
    slides: dict[str, SlideFeatures] = {}

    for image, p in paths.items():
        slides[image] = SlideFeatures(features=_LazyTensor(p, torch))
    return samples, slides


class _LazyTensor:
    """A ``.pt`` tensor read on first use (the official features are ~2.4 MB each)."""

    def __init__(self, path: Path, torch: Any) -> None:
        self.path = path
        self._torch = torch

    def load(self) -> Any:
        try:
            t = self._torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise TrainError(f"{self.path}: cannot read the feature tensor ({e})") from None
        if not isinstance(t, self._torch.Tensor) or t.dim() != 2:
            raise TrainError(f"{self.path}: expected a (n_tokens, dim) tensor")
        return t.float()


def load_train_data(cfg: DataConfig) -> TrainData:
    """Every sample of the configured packs / bench files (missing files are listed before training)."""
    import torch

    missing = [str(p) for p in cfg.packs if not p.is_file()]
    if missing:
        raise TrainError(
            "feature pack(s) not found (make them with `wsi-llava train prepare`): " + ", ".join(missing)
        )
    samples: list[Sample] = []
    slides: dict[str, SlideFeatures] = {}
    encoder_ids: set[str] = set()
    for p in cfg.packs:
        pack = load_pack(p)
        encoder_ids.add(str(pack["encoder_id"]))
        for key, s in pack["slides"].items():
            slides[key] = SlideFeatures(
                features=s["features"].float(),
                coords=torch.as_tensor(s["coords"]).long(),
                tile_size_level0=int(s["tile_size_level0"]),
            )
        for row in pack["samples"]:
            tiles = tuple(row["tiles"]) if row["tiles"] is not None else None
            samples.append(
                Sample(row["slide"], row["task"], row["kind"], row["question"], row["answer"], tiles)
            )
    if cfg.bench:
        s2, sl2 = _token_files(cfg)
        samples += s2
        slides.update(sl2)
    if cfg.tasks is not None:
        keep = set(cfg.tasks)
        samples = [s for s in samples if s.task in keep]
    if not samples:
        raise TrainError("no training samples (check data.packs / data.bench and data.tasks)")
    if cfg.option_permutations:
        from wsi_llava.train.augment import with_option_permutations

        samples = with_option_permutations(samples, cfg.option_permutations)
    return TrainData(samples=samples, slides=slides, encoder_ids=encoder_ids)


# --- batching -------------------------------------------------------------------------------------
def epoch_batches(
    lengths: list[int], global_batch: int, seed: int, epoch: int, group_by_length: bool = True
) -> list[list[int]]:
    """Sample indices of each global batch of one epoch: shuffled, then length-grouped in megabatches.

    Deterministic in ``(seed, epoch)``, so a resumed run sees the same batches. The last incomplete
    batch is dropped (every step has the same global batch, whatever the number of GPUs).
    """
    order = list(range(len(lengths)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    n = (len(order) // global_batch) * global_batch
    order = order[:n]
    batches = [order[i : i + global_batch] for i in range(0, n, global_batch)]
    if group_by_length:
        mega = 8
        grouped: list[list[int]] = []
        for m in range(0, len(batches), mega):
            flat = sorted((i for b in batches[m : m + mega] for i in b), key=lambda i: -lengths[i])
            grouped += [flat[i : i + global_batch] for i in range(0, len(flat), global_batch)]
        rng = random.Random(seed * 7_919 + epoch)
        rng.shuffle(grouped)
        batches = grouped
    return batches


def shard(batch: list[int], rank: int, world: int, batch_size: int) -> list[list[int]]:
    """This rank's micro-batches of one global batch (rank r takes every world-th sample)."""
    mine = batch[rank::world]
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


def steps_per_epoch(n_samples: int, global_batch: int) -> int:
    """Optimizer steps in one epoch (incomplete batches dropped)."""
    return n_samples // global_batch


def total_steps(n_samples: int, global_batch: int, epochs: float, max_steps: int | None) -> int:
    """Optimizer steps of the whole run."""
    spe = steps_per_epoch(n_samples, global_batch)
    if spe < 1:
        raise TrainError(
            f"{n_samples} samples are fewer than one global batch ({global_batch}); "
            "lower train.batch_size or train.grad_accum"
        )
    steps = max(1, math.ceil(spe * epochs))
    return min(steps, max_steps) if max_steps else steps


def iter_steps(
    lengths: list[int], global_batch: int, seed: int, start_step: int, n_steps: int, group_by_length: bool
) -> Iterator[tuple[int, int, list[int]]]:
    """``(step, epoch, global batch)`` from ``start_step`` (0-based) to ``n_steps``."""
    spe = steps_per_epoch(len(lengths), global_batch)
    step = start_step
    while step < n_steps:
        epoch, offset = divmod(step, spe)
        batches = epoch_batches(lengths, global_batch, seed, epoch, group_by_length)
        for b in batches[offset:]:
            if step >= n_steps:
                return
            yield step, epoch, b
            step += 1
