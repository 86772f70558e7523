"""Cohort featurization on 1 GPU vs N GPUs (torchrun), same slides, same machine, same call.

Generates a cohort of pyramidal TIFFs (deflate tiles, written with tifffile alone, so no imagecodecs is
needed), then runs ``wsi-llava extract --list`` as one process and under ``torchrun --nproc-per-node N``,
each into its own cache, checks that both caches hold the same entries with bit-identical features, and
writes timings and ratios as JSON. The tile encoder is the registered ``demo-vit`` with random weights.

    python benchmarks/bench_cohort.py --out benchmarks/results/cohort.json [--nproc 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

logger = logging.getLogger("bench_cohort")

TILE = 256
MPP = 0.5
LEVEL_DOWNSAMPLES = (4, 16, 64)
#: tiles per side of each slide; a 2-tile white margin is background, the rest tissue
FULL_SIDES = (72, 68, 64, 60, 56, 52, 48, 44)  # 24,000 tissue tiles in 8 slides
QUICK_SIDES = (12, 10, 9, 8)


def _tile_pool(seed: int, n: int = 24) -> np.ndarray:
    """``n`` tissue-like 256-px tiles (pink/purple with noise and dark nuclei), uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:TILE, 0:TILE]
    tiles = np.empty((n, TILE, TILE, 3), np.uint8)
    for i in range(n):
        base = rng.uniform([150, 80, 150], [235, 160, 200])
        coarse = rng.normal(0, 10, (TILE // 16, TILE // 16, 3))
        img = base + np.kron(coarse, np.ones((16, 16, 1))) + rng.normal(0, 4, (TILE, TILE, 3))
        for cx, cy, r in zip(
            rng.integers(0, TILE, 30), rng.integers(0, TILE, 30), rng.integers(3, 8, 30), strict=True
        ):
            img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = (80, 40, 110)
        tiles[i] = np.clip(img, 0, 255).astype(np.uint8)
    return tiles


def _layout(side: int, seed: int) -> np.ndarray:
    """Pool index per tile cell, -1 for background (a 2-tile margin)."""
    rng = np.random.default_rng(seed + 1000)
    idx = rng.integers(0, 24, (side, side))
    idx[:2], idx[-2:], idx[:, :2], idx[:, -2:] = -1, -1, -1, -1
    return idx


def _level(pool: np.ndarray, layout: np.ndarray, ds: int) -> np.ndarray:
    t = TILE // ds
    small = pool.reshape(len(pool), t, ds, t, ds, 3).mean(axis=(2, 4)).astype(np.uint8)
    white = np.full((t, t, 3), 242, np.uint8)
    rows = [np.concatenate([small[i] if i >= 0 else white for i in row], axis=1) for row in layout]
    return np.ascontiguousarray(np.concatenate(rows, axis=0))


def write_slide(path: str, side: int, seed: int) -> int:
    """A pyramidal TIFF of ``side`` x ``side`` 256-px tiles at 0.5 µm/px; returns its tissue tile count."""
    import tifffile

    pool = _tile_pool(seed)
    layout = _layout(side, seed)
    white = np.full((TILE, TILE, 3), 242, np.uint8)
    kw = dict(tile=(TILE, TILE), photometric="rgb", compression="zlib", compressionargs={"level": 1})
    r = 1e4 / MPP
    tmp = path + ".tmp"
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        tw.write(
            (pool[i] if i >= 0 else white for i in layout.ravel()),
            shape=(side * TILE, side * TILE, 3),
            dtype=np.uint8,
            resolution=(r, r),
            resolutionunit="CENTIMETER",
            subfiletype=0,
            metadata=None,
            **kw,
        )
        for ds in LEVEL_DOWNSAMPLES:
            tw.write(
                _level(pool, layout, ds),
                resolution=(r / ds, r / ds),
                resolutionunit="CENTIMETER",
                subfiletype=1,
                metadata=None,
                **kw,
            )
    os.replace(tmp, path)
    return int((layout >= 0).sum())


def make_cohort(workdir: Path, sides: tuple[int, ...]) -> list[Path]:
    slides = workdir / "slides"
    slides.mkdir(parents=True, exist_ok=True)
    paths = [slides / f"cohort_{i:02d}_{s}x{s}.tif" for i, s in enumerate(sides)]
    todo = [(str(p), s, i) for p, s, i in zip(paths, sides, range(len(sides)), strict=True) if not p.exists()]
    if todo:
        with ProcessPoolExecutor(max_workers=min(len(todo), os.cpu_count() or 1)) as ex:
            list(ex.map(write_slide, *zip(*todo, strict=True)))
    return paths


def _clean_env() -> dict[str, str]:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def run_extract(
    label: str,
    launcher: list[str],
    list_file: Path,
    cache: Path,
    summary: Path,
    args: argparse.Namespace,
    workers: int,
) -> dict:
    shutil.rmtree(cache, ignore_errors=True)
    cmd = [
        *launcher,
        "extract",
        "--list",
        str(list_file),
        "--cache",
        str(cache),
        "--device",
        args.device,
        "--batch-size",
        str(args.batch_size),
        "--workers",
        str(workers),
        "--summary",
        str(summary),
    ]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=_clean_env(), timeout=args.timeout)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"{label} failed ({out.returncode}):\n{' '.join(cmd)}\n{out.stderr[-4000:]}")
    rep = json.loads(summary.read_text())
    tiles = sum(o["n_tiles"] for o in rep["outcomes"] if o["ok"])
    span = max(t["end"] for t in rep["timings"]) - min(t["start"] for t in rep["timings"])
    return {
        "label": label,
        "workers_per_process": workers,
        "command": " ".join(cmd),
        "process_wall_s": round(wall, 3),
        "extract_wall_s": round(span, 3),
        "tiles": tiles,
        "tiles_per_s": round(tiles / span, 1),
        "per_rank": [
            {
                "rank": t["rank"],
                "device": t["device"],
                "slides": t["n_slides"],
                "tiles": t["n_tiles"],
                "seconds": round(t["end"] - t["start"], 3),
            }
            for t in rep["timings"]
        ],
        "failed": [o["path"] for o in rep["outcomes"] if not o["ok"]],
    }


def cache_contents(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    import zarr

    out = {}
    for p in sorted((root / "features").iterdir()):
        if p.name.startswith(".") or not (p / "zarr.json").is_file():
            continue
        g = zarr.open_group(str(p), mode="r")
        out[p.name] = (np.asarray(g["coords"][:]), np.asarray(g["features"][:]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cohort.json")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/wsi_llava_cohort_bench"))
    ap.add_argument("--nproc", type=int, default=2, help="processes (GPUs) for the sharded run")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=6, help="tile-reading threads per process")
    ap.add_argument("--quick", action="store_true", help="4 small slides (a CPU smoke test)")
    ap.add_argument("--more-workers", action="store_true", help="also 1 process with nproc x workers")
    ap.add_argument("--timeout", type=int, default=400)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    t0 = time.perf_counter()
    sides = QUICK_SIDES if args.quick else FULL_SIDES
    slides = make_cohort(args.workdir, sides)
    gen_s = time.perf_counter() - t0
    list_file = args.workdir / "cohort.txt"
    list_file.write_text("".join(f"{p}\n" for p in slides))
    py = [sys.executable, "-m", "wsi_llava.cli"]
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={args.nproc}",
    ]
    torchrun += ["-m", "wsi_llava.cli"]
    w = args.workdir
    nw = args.workers
    runs = [run_extract("1 process", py, list_file, w / "c1", w / "s1.json", args, nw)]
    label = f"{args.nproc} processes (torchrun)"
    runs.append(run_extract(label, torchrun, list_file, w / "cN", w / "sN.json", args, nw))
    if args.more_workers:
        label = f"1 process, {args.nproc * nw} workers"
        runs.append(run_extract(label, py, list_file, w / "c1w", w / "s1w.json", args, args.nproc * nw))
    a, b = cache_contents(w / "c1"), cache_contents(w / "cN")
    identical = sorted(a) == sorted(b) and all(
        np.array_equal(a[k][0], b[k][0]) and np.array_equal(a[k][1], b[k][1]) for k in a
    )

    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    result = {
        "what": "wsi-llava extract --list over a generated cohort: 1 process vs torchrun, same machine",
        "encoder": "demo-vit (registered; ViT 112 px, patch 16, 192-d, 4 layers), random weights (seed 0)",
        "slides": len(slides),
        "tissue_tiles": int(sum((s - 4) ** 2 for s in sides)),
        "slide_format": "pyramidal TIFF, 256-px deflate (zlib level 1) tiles, 0.5 µm/px, levels 1/4/16/64",
        "tile_size": 256,
        "target_mpp": MPP,
        "batch_size": args.batch_size,
        "workers_per_process": args.workers,
        "generate_s": round(gen_s, 2),
        "machine": {
            "gpus": gpus,
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "runs": runs,
        "speedup_extract": round(runs[0]["extract_wall_s"] / runs[1]["extract_wall_s"], 3),
        "speedup_process_wall": round(runs[0]["process_wall_s"] / runs[1]["process_wall_s"], 3),
        "identical_cache": identical,
        "cache_entries": len(a),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{'run':34s} {'extract s':>10s} {'process s':>10s} {'tiles/s':>9s}")
    for r in runs:
        print(
            f"{r['label']:34s} {r['extract_wall_s']:10.2f} {r['process_wall_s']:10.2f} {r['tiles_per_s']:9.0f}"
        )
    print(
        f"speedup (extraction span) {result['speedup_extract']}x; whole processes "
        f"{result['speedup_process_wall']}x; identical caches: {identical} ({len(a)} entries); "
        f"GPUs {gpus or 'none'}"
    )


if __name__ == "__main__":
    main()
