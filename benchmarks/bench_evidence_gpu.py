"""What the evidence costs on the paper-size model: integrated gradients through a 7B LLM and LongNet.

    python benchmarks/bench_evidence_gpu.py [--tiles 20000] [--steps 8] [--out JSON]   # one H100 / H200
    python benchmarks/bench_evidence_gpu.py --tiny --device cpu --tiles 300            # CPU smoke test

A random Vicuna-7B-shape Llama with the mlp2x_gelu projector (``bench_decode.build_model``) and a
Prov-GigaPath-shape LongNet slide encoder, bf16 on the GPU, over random 1536-d features of a ``--tiles``
tile grid: the answer (slide encoding + prefill + ``--answer-tokens`` decoded tokens) and then
``tile_relevance`` (what every front end runs), each timed with its peak GPU memory (torch's allocator,
reset before each). The answer is the baseline the evidence is added to. Writes
``benchmarks/results/evidence_gpu.json`` and ``evidence_7b_*`` keys into ``results/summary.json``.
"""

from __future__ import annotations

import argparse
import logging
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_decode as bd  # noqa: E402
from bench_paper_model_cli import merge_summary, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
logger = logging.getLogger("bench_evidence_gpu")


def _gib(n: int) -> float:
    return round(n / 2**30, 3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiles", type=int, default=20000)
    ap.add_argument("--steps", type=int, default=None, help="integration steps (default: the core's)")
    ap.add_argument("--answer-tokens", type=int, default=64)
    ap.add_argument("--tiny", action="store_true", help="tiny LLM and demo LongNet (smoke test)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=RESULTS / "evidence_gpu.json")
    ap.add_argument("--summary", type=Path, default=RESULTS / "summary.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import numpy as np
    import torch

    from wsi_llava.model.evidence import DEFAULT_STEPS
    from wsi_llava.slide_encoder.slide_encoder import SlideEncoder, SlideEncoderConfig

    steps = args.steps or DEFAULT_STEPS
    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    model = bd.build_model(args.tiny, args.device, dtype, 576)
    cfg = (
        SlideEncoderConfig.demo(in_dim=1536, pad_to=bd.VIS_DIM)
        if args.tiny
        else SlideEncoderConfig.gigapath()
    )
    torch.manual_seed(2)
    with torch.device(args.device):
        model.slide_encoder = SlideEncoder(cfg).to(dtype).eval()
    side = math.ceil(math.sqrt(args.tiles))
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[: args.tiles] * 256
    coords = torch.from_numpy(grid.astype(np.int64))
    feats = torch.randn(args.tiles, cfg.in_dim, generator=torch.Generator().manual_seed(3))
    question = bd.question_for(model, bd.N_TEXT)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    weights = torch.cuda.memory_allocated() if cuda else 0

    def timed(fn: Any) -> tuple[Any, float, float]:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        return out, time.perf_counter() - t, (torch.cuda.max_memory_allocated() if cuda else 0)

    def answer() -> list[int]:
        vis = model.encode_slide(feats, coords, 256)
        model.generate_text(question, vis, max_new_tokens=args.answer_tokens, temperature=0.0)
        return list(model.last_generation.new_token_ids)

    answer()  # warm-up: kernels, allocator
    ids, answer_s, answer_peak = timed(answer)
    model.tile_relevance(question, feats[:64], coords[:64], 256, ids[:2], steps=1)  # warm-up of the backward
    scores, evidence_s, evidence_peak = timed(
        lambda: model.tile_relevance(question, feats, coords, 256, ids, steps=steps)
    )
    assert np.isfinite(scores).all() and abs(float(scores.sum()) - 1.0) < 1e-6
    card = torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu"
    result = {
        "what": "integrated-gradients evidence on a random 7B-shape LLaVA with a GigaPath-shape LongNet"
        if not args.tiny
        else "smoke test: tiny LLM, demo-shape LongNet",
        "device": card,
        "torch": torch.__version__,
        "dtype": str(dtype),
        "tiles": args.tiles,
        "steps": steps,
        "answer_tokens": len(ids),
        "weights_gib": _gib(weights),
        "answer": {"seconds": round(answer_s, 3), "peak_gib": _gib(answer_peak)},
        "evidence": {
            "seconds": round(evidence_s, 3),
            "peak_gib": _gib(evidence_peak),
            "seconds_per_step": round(evidence_s / steps, 3),
        },
    }
    write_json(args.out, result)
    if not args.tiny:
        keys = {
            "evidence_7b_seconds": result["evidence"]["seconds"],
            "evidence_7b_peak_gpu_gib": result["evidence"]["peak_gib"],
        }
        merge_summary(args.summary, keys | {f"{k}_card": card for k in keys})
    print(f"\nevidence cost, {card}, {args.tiles} tiles, {steps} steps, {len(ids)} answer tokens")
    print(f"{'stage':<10} {'seconds':>8} {'peak GiB':>9}   (weights {result['weights_gib']} GiB)")
    for k in ("answer", "evidence"):
        print(f"{k:<10} {result[k]['seconds']:>8.2f} {result[k]['peak_gib']:>9.2f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
