"""Continuous batching benchmark: N concurrent greedy answers through ``Batcher`` vs one at a time.

    python benchmarks/bench_batching.py                        # the demo model on CPU
    python benchmarks/bench_batching.py --device cuda          # writes results/batching_gpu.json
    python benchmarks/bench_batching.py --model NAME --sizes 1,4,16,64 --max-new-tokens 64

For each N: N different questions, each about its own random visual tokens (the model's shape), greedy,
``--max-new-tokens`` at most. Baseline: the same N answers one after another through ``model.stream``
(on CUDA with its default fast decoding). Batched: all N submitted at once to one ``Batcher`` and read by
N threads. Aggregate tokens/s = all new tokens / wall time of the whole set (prefills included, as a
server sees them). The token ids of both runs are compared answer by answer. A warm-up answer of each
kind runs first (kernels, CUDA graphs of the first bucket). The baseline runs in a worker thread like the
batcher's loop: on a loaded 2-core CPU the same ``stream`` called from the main thread ran several times
slower than from any other thread, which would flatter the batcher.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
QUESTIONS = [
    "Describe the tissue.",
    "What is shown in this slide?",
    "Is there necrosis?",
    "What is the diagnosis?",
    "Which cells dominate this region?",
    "Is the tumour invasive?",
    "Describe the stroma.",
    "What grade is this carcinoma?",
    "Are there mitoses?",
    "Is there lymphocytic infiltrate?",
    "Describe the nuclei.",
    "What type of tissue is this?",
    "Is this benign or malignant?",
    "Where is the tumour?",
    "Describe the architecture of the glands.",
    "What would you report for this slide?",
]

logger = logging.getLogger("bench_batching")


def load(name: str, device: str, dtype: str | None) -> Any:
    """A model by name; ``random-7b`` / ``random-tiny``: bench_decode's random Vicuna-7B-shape (or tiny) Llama."""
    if name in ("random-7b", "random-tiny"):
        import sys

        import torch

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_decode import N_VISUAL, build_model

        tdtype = getattr(torch, dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
        return build_model(name == "random-tiny", device, tdtype, N_VISUAL if name == "random-7b" else 64)
    from wsi_llava.model import load_model

    return load_model(name, device=device, dtype=dtype)


def requests(model: Any, n: int) -> list[tuple[str, Any]]:
    """``n`` questions, each with its own random visual tokens (word-level ``w<id>`` questions for the
    random models, whose tokenizer knows no English)."""
    import torch

    words = model.spec.llm.source == "random"
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(1000 + i)
        vis = torch.randn(model.n_visual_tokens, model.spec.projector.in_dim, generator=g)
        q = " ".join(f"w{100 + 37 * i + j}" for j in range(24)) if words else QUESTIONS[i % len(QUESTIONS)]
        out.append((q, vis.to(model.dtype)))
    return out


def run_alone(model: Any, reqs: list, max_new: int) -> tuple[float, list]:
    """The answers one after another in one worker thread (as a server's handler runs them)."""
    results: list = []
    wall: list[float] = []

    def work() -> None:
        t0 = time.perf_counter()
        for q, v in reqs:
            for _ in model.stream(q, v, max_new_tokens=max_new, temperature=0.0):
                pass
            results.append(model.last_generation)
        wall.append(time.perf_counter() - t0)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    return wall[0], results


def run_batched(batcher: Any, reqs: list, max_new: int) -> tuple[float, list]:
    """All the answers submitted at once, each read by its own thread."""
    t0 = time.perf_counter()
    streams = [batcher.submit(q, v, max_new_tokens=max_new, temperature=0.0) for q, v in reqs]
    threads = [threading.Thread(target=lambda s=s: [None for _ in s]) for s in streams]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, [s.result for s in streams]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo", help="a model name or checkpoint folder (default: demo)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--sizes", default="1,4,16", help="comma-separated numbers of concurrent answers")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from wsi_llava.model.batching import Batcher

    model = load(args.model, args.device, args.dtype)
    device = model.device
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    out = args.out or RESULTS / ("batching_gpu.json" if device.type == "cuda" else "batching_cpu.json")
    sizes = [int(s) for s in args.sizes.split(",")]
    batcher = Batcher(model, max_batch=args.max_batch)
    # warm-up: kernels, the single-stream decoder, and the batcher's buffers and graphs at full size
    t0 = time.perf_counter()
    run_alone(model, requests(model, 1), args.max_new_tokens)
    for n in sizes:
        run_batched(batcher, requests(model, n), args.max_new_tokens)
    warm_seconds = time.perf_counter() - t0
    rows = []
    for n in sizes:
        reqs = requests(model, n)
        load0 = os.getloadavg()[0]
        t_alone, alone = run_alone(model, reqs, args.max_new_tokens)
        t_batch, batched = run_batched(batcher, reqs, args.max_new_tokens)
        ids_alone = [r.new_token_ids for r in alone]
        ids_batch = [r.new_token_ids for r in batched]
        tokens = sum(len(i) for i in ids_alone)
        row = {
            "n": n,
            "new_tokens": tokens,
            "alone_seconds": round(t_alone, 3),
            "batched_seconds": round(t_batch, 3),
            "alone_prefill_seconds": round(sum(r.prefill_seconds for r in alone), 3),
            "batched_prefill_seconds": round(sum(r.prefill_seconds for r in batched), 3),
            "alone_tok_s": round(tokens / t_alone, 2),
            "batched_tok_s": round(sum(len(i) for i in ids_batch) / t_batch, 2),
            "speedup": round(t_alone / t_batch, 2),
            "same_ids": ids_alone == ids_batch,
            "n_same_ids": sum(a == b for a, b in zip(ids_alone, ids_batch, strict=True)),
            "alone_decode_paths": sorted({r.decode_path for r in alone}),
            "batched_decode_paths": sorted({r.decode_path for r in batched}),
            "load_avg": [round(load0, 2), round(os.getloadavg()[0], 2)],
        }
        rows.append(row)
        logger.info("N=%d done: %s", n, row)
    header = f"{'N':>3} {'tokens':>7} {'alone s':>8} {'batched s':>9} {'alone tok/s':>11} {'batched tok/s':>13} {'x':>5} same ids"
    print(header)
    for r in rows:
        print(
            f"{r['n']:>3} {r['new_tokens']:>7} {r['alone_seconds']:>8.2f} {r['batched_seconds']:>9.2f} "
            f"{r['alone_tok_s']:>11.1f} {r['batched_tok_s']:>13.1f} {r['speedup']:>5.2f} "
            f"{r['n_same_ids']}/{r['n']}"
        )
    dec = batcher._dec
    capture = round(dec.capture_seconds, 3) if dec is not None else None
    batcher.close()
    report = {
        "what": "aggregate tokens/s of N concurrent greedy answers: Batcher vs one at a time through model.stream",
        "model": args.model,
        "model_name": model.spec.name,
        "device": str(device),
        "gpu": gpu,
        "dtype": str(model.dtype),
        "max_new_tokens": args.max_new_tokens,
        "max_batch": args.max_batch,
        "warm_up_seconds": round(warm_seconds, 2),
        "graph_capture_seconds": capture,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "rows": rows,
    }
    from wsi_llava.atomic import atomic_write_text

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    logger.info("wrote %s", out)


if __name__ == "__main__":
    main()
