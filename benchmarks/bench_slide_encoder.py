"""The LongNet slide encoder (Prov-GigaPath shape: 12 layers x 768-d, 16 heads) at 10k-100k tiles, bf16.

Times one forward pass (median of CUDA-event timed runs after a warm-up) and the peak memory above the
weights and inputs, for the implementation before issue 7 (``longnet_v0.py``: per-branch dense scatter,
float32 GELU copy) and the current one with flash attention, cuDNN attention, and the default ``auto``
choice between them, on the same card in the same run. Numerics: each bf16 output against the old implementation's, and at <= 20k tiles
against the old implementation run in float32.

    python benchmarks/bench_slide_encoder.py --out benchmarks/results/slide_encoder.json [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import longnet_v0  # noqa: E402

from wsi_llava.slide_encoder import longnet  # noqa: E402
from wsi_llava.slide_encoder.config import SlideEncoderConfig  # noqa: E402

NEW_DILATED = longnet.dilated_attention
NEW_FFN = longnet.FeedForward.forward


@contextlib.contextmanager
def variant(name: str):
    """Swap in one implementation: ``old``, ``new`` (flash), ``new-cudnn`` or ``new-auto`` (the default)."""
    saved = (longnet.dilated_attention, longnet.FeedForward.forward, longnet.CUDA_HALF_KERNEL)
    if name == "old":
        longnet.dilated_attention = longnet_v0.dilated_attention
        longnet.FeedForward.forward = longnet_v0.feedforward_forward
        longnet.CUDA_HALF_KERNEL = "flash"
    else:
        longnet.dilated_attention = NEW_DILATED
        longnet.FeedForward.forward = NEW_FFN
        longnet.CUDA_HALF_KERNEL = {"new": "flash", "new-cudnn": "cudnn", "new-auto": "auto"}[name]
    try:
        yield
    finally:
        longnet.dilated_attention, longnet.FeedForward.forward, longnet.CUDA_HALF_KERNEL = saved


def inputs(n: int, in_dim: int, dev: torch.device, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    cells = torch.randperm(1000 * 1000, generator=g)[:n]
    coords = torch.stack([cells % 1000, cells // 1000], dim=1).unsqueeze(0) * 256
    feats = torch.randn(1, n, in_dim, generator=g)
    return feats.to(dev, dtype), coords.to(dev)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(model, feats, coords, dev: torch.device, reps: int) -> tuple[list[float], float, torch.Tensor]:
    """Per-run milliseconds, peak GiB above what was allocated before, and the output."""
    with torch.inference_mode():
        out = model(feats, coords, 256)  # warm-up
        sync(dev)
        times = []
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
        for _ in range(reps):
            if dev.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = model(feats, coords, 256)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                out = model(feats, coords, 256)
                times.append((time.perf_counter() - t0) * 1e3)
        peak = (torch.cuda.max_memory_allocated(dev) - base) / 2**30 if dev.type == "cuda" else float("nan")
    return times, peak, out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "slide_encoder.json")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 20_000, 50_000, 100_000])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--ref-max", type=int, default=20_000, help="largest size with a float32 reference")
    ap.add_argument("--quick", action="store_true", help="small sizes and 2 layers (a CPU smoke test)")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = SlideEncoderConfig.gigapath()
    if args.quick:
        cfg = SlideEncoderConfig.gigapath(depth=2)
        args.sizes, args.reps, args.ref_max = [1500, 7000], 2, 7000
    torch.manual_seed(0)
    model32 = longnet.LongNetViT(cfg).to(dev).eval()
    model = copy.deepcopy(model32).to(torch.bfloat16)
    names = ["old", "new", "new-cudnn", "new-auto"] if dev.type == "cuda" else ["old", "new"]
    rows = []
    for n in args.sizes:
        feats, coords = inputs(n, cfg.in_dim, dev, torch.bfloat16, seed=n)
        row: dict = {"tiles": n, "variants": {}}
        outs = {}
        for name in names:
            with variant(name):
                longnet._FUSED_BROKEN.discard(dev.type)
                times, peak, out = timed(model, feats, coords, dev, args.reps if n < 50_000 else 3)
                kernel = "old" if name == "old" else longnet._half_kernel(n, dev)
            outs[name] = out.float()
            row["variants"][name] = {
                "median_ms": round(statistics.median(times), 2),
                "runs_ms": [round(t, 2) for t in times],
                "peak_gib_above_inputs": round(peak, 3),
                "fused_kernel": dev.type not in longnet._FUSED_BROKEN,
                "kernel": kernel,
                "cudnn_refused": "cudnn" in longnet._FUSED_BROKEN,
            }
        for name in names[1:]:
            row["variants"][name]["rel_err_vs_old_bf16"] = rel(outs[name], outs["old"])
            row["variants"][name]["speedup_vs_old"] = round(
                row["variants"]["old"]["median_ms"] / row["variants"][name]["median_ms"], 3
            )
        if n <= args.ref_max:
            with variant("old"), torch.inference_mode():
                ref = model32(feats.float(), coords, 256).float()
            for name in names:
                row["variants"][name]["rel_err_vs_old_fp32"] = rel(outs[name], ref)
            del ref
        del outs
        rows.append(row)
        line = "  ".join(
            f"{k} {v['median_ms']:.1f} ms ({v['peak_gib_above_inputs']:.2f} GiB)"
            for k, v in row["variants"].items()
        )
        print(f"{n:>7d} tiles: {line}", flush=True)
    result = {
        "what": "LongNet slide encoder forward, Prov-GigaPath shape (12 x 768-d, 16 heads, segments "
        f"{list(cfg.segment_lengths)}, ratios {list(cfg.dilated_ratios)}), random weights, bf16, batch 1",
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "depth": cfg.depth,
        "baseline": "old = longnet_v0.py (the implementation before issue 7)",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{'tiles':>7s} " + " ".join(f"{k:>22s}" for k in names) + "  rel.err new vs old")
    for r in rows:
        v = r["variants"]
        cells = " ".join(
            f"{v[k]['median_ms']:>9.1f} ms x{v[k].get('speedup_vs_old', 1):<6.2f}" for k in names
        )
        print(f"{r['tiles']:>7d} {cells}  {v['new']['rel_err_vs_old_bf16']:.2e}")


if __name__ == "__main__":
    main()
