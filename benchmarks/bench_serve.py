"""``wsi-llava serve`` under load: many users asking at once against the same requests one at a time.

    python benchmarks/bench_serve.py                                   # CPU, the demo model
    python benchmarks/bench_serve.py --device cuda --model NAME --slides-root DIR --slide a.tif --out $OUT/serve_gpu.json

Starts a real ``wsi-llava serve`` process on 127.0.0.1 (or uses ``--server URL``), warms it (the slides'
features extracted once, the decoder built), then for each concurrency N in ``--concurrency``:

* **sequential** (the baseline, what a client loop would do without a batching server): the same N
  requests sent one at a time, each waiting for the one before;
* **concurrent**: the N requests at once, from N client threads.

Each request is an SSE ``/v1/ask`` (greedy, ``--max-new-tokens``, evidence off: this measures decoding),
different questions about whole slides and regions. Per mode: aggregate tokens/s (all new tokens over the
wall time of the mode), p50 / p99 time to first token (the first ``token`` event) and request latency.
Writes JSON and merges the headline keys into ``--summary``: ``serve_cpu_16_vs_sequential`` on a CPU
server, ``serve_16_vs_sequential`` and ``serve_p99_ttft_s`` (at 16) on a GPU one, each with ``_card``.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from bench_paper_model_cli import merge_summary, write_json  # noqa: E402

from wsi_llava.answer import Answer  # noqa: E402
from wsi_llava.errors import WsiLlavaError  # noqa: E402
from wsi_llava.serve.client import ServerClient, read_token  # noqa: E402
from wsi_llava.serve.schemas import AskRequest, TokenEvent  # noqa: E402

logger = logging.getLogger("bench_serve")
RESULTS = Path(__file__).parent / "results"
QUESTIONS = (
    "Describe the tissue in this region.",
    "What is the most likely diagnosis?",
    "Which tissue types are present?",
    "Is there tumour in this region?",
    "Is there necrosis?",
    "What is the histological grade of the tumour?",
    "What tissue is in this region?",
    "Describe this region.",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(args: argparse.Namespace, root: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """A ``wsi-llava serve`` process on a free loopback port, once its health endpoint answers."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "wsi_llava.cli", "serve", "--model", args.model, "--slides-root", str(root),
        "--host", "127.0.0.1", "--port", str(port), "--device", args.device,
        "--max-batch", str(args.max_batch), "--queue", str(max(args.concurrency) * 2),
        "--log-level", args.server_log_level,
    ]  # fmt: skip
    if args.cache:
        cmd += ["--cache", str(args.cache)]
    out = log.open("w")
    proc = subprocess.Popen(
        cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"wsi-llava serve exited with {proc.returncode}; see {log}")
        try:
            with ServerClient(url, timeout=2) as c:
                c.health()
            return proc, url
        except WsiLlavaError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"wsi-llava serve did not answer within {args.start_timeout} s; see {log}")


def requests_for(n: int, slides: list[str], dims: dict[str, tuple[int, int]]) -> list[dict[str, Any]]:
    """``n`` different questions: alternating slides, every third one about a centred rectangle."""
    out = []
    for i in range(n):
        slide = slides[i % len(slides)]
        body: dict[str, Any] = {"slide": slide, "question": QUESTIONS[i % len(QUESTIONS)], "evidence": False}
        if i % 3 == 2:
            w, h = dims[slide]
            body["rectangle"] = {"x": w * 0.25, "y": h * 0.25, "width": w * 0.5, "height": h * 0.5}
        out.append(body)
    return out


def ask(client: ServerClient, body: dict[str, Any]) -> dict[str, Any]:
    """One streamed ask: time to the first token event, latency, new tokens (from the final Answer)."""
    t0 = time.perf_counter()
    ttft = None
    try:
        for event in client.ask_events(AskRequest(**body)):
            if isinstance(event, TokenEvent) and ttft is None:
                ttft = time.perf_counter() - t0
            elif isinstance(event, Answer):
                latency = time.perf_counter() - t0
                return {
                    "ttft_s": ttft if ttft is not None else latency,
                    "latency_s": latency,
                    "new_tokens": int(event.timings.new_tokens),
                    "decode_path": event.timings.decode_path,
                    "text": event.answer,
                }
    except WsiLlavaError as e:
        return {"error": str(e)}
    return {"error": "stream ended without an answer"}


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of ``values``."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]


def run_mode(client: ServerClient, reqs: list[dict[str, Any]], concurrent: bool) -> dict[str, Any]:
    """Send ``reqs`` one at a time or all at once; aggregate figures over the mode's wall time."""
    results: list[dict[str, Any] | None] = [None] * len(reqs)
    t0 = time.perf_counter()
    if concurrent:

        def work(i: int) -> None:
            results[i] = ask(client, reqs[i])

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(reqs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for i, body in enumerate(reqs):
            results[i] = ask(client, body)
    wall = time.perf_counter() - t0
    done = [r for r in results if r is not None and "error" not in r]
    errors = [r["error"] for r in results if r is not None and "error" in r]
    tokens = sum(r["new_tokens"] for r in done)
    row: dict[str, Any] = {"requests": len(reqs), "ok": len(done), "errors": errors[:3], "wall_s": round(wall, 3),
                           "new_tokens": tokens, "tokens_per_s": round(tokens / wall, 2) if wall > 0 else None}  # fmt: skip
    if done:
        ttft = [r["ttft_s"] for r in done]
        lat = [r["latency_s"] for r in done]
        row.update({
            "ttft_p50_s": round(pct(ttft, 0.5), 4), "ttft_p99_s": round(pct(ttft, 0.99), 4),
            "latency_p50_s": round(pct(lat, 0.5), 4), "latency_p99_s": round(pct(lat, 0.99), 4),
        })  # fmt: skip
    row["decode_paths"] = sorted({str(r.get("decode_path")) for r in done})
    row["texts"] = [r["text"] if r is not None and "error" not in r else None for r in results]
    return row


def make_world(root: Path) -> list[str]:
    """Two demo slides (the synthetic world) under ``root``; their names relative to it."""
    from wsi_llava.synth import generate_world

    generate_world(root, n_slides=2, seed=11, size=(2560, 2560))
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.tif*"))


def slide_dims(root: Path, slides: list[str]) -> dict[str, tuple[int, int]]:
    from wsi_llava.slide import open_slide

    dims = {}
    for s in slides:
        with open_slide(root / s) as r:
            dims[s] = tuple(int(v) for v in r.dimensions)
    return dims


def machine(client: ServerClient) -> dict[str, Any]:
    info: dict[str, Any] = {"host": platform.node(), "cpus": os.cpu_count(), "load_avg": os.getloadavg()}
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - the card's name is a label, not a requirement
        pass
    info["server"] = client.health().model_dump(mode="json")
    return info


def print_table(result: dict[str, Any]) -> None:
    print(f"\nwsi-llava serve, model {result['config']['model']} on {result['config']['device']}")
    print(
        f"{'N':>4} {'mode':<11} {'ok':>4} {'tok/s':>8} {'ratio':>6} {'TTFT p50':>9} {'TTFT p99':>9} {'lat p50':>8} {'lat p99':>8}"
    )
    for row in result["rows"]:
        for mode in ("sequential", "concurrent"):
            m = row[mode]
            ratio = f"{row['ratio']:.2f}" if mode == "concurrent" and row.get("ratio") else ""
            print(
                f"{row['n']:>4} {mode:<11} {m['ok']:>4} {m.get('tokens_per_s') or 0:>8.1f} {ratio:>6} "
                f"{m.get('ttft_p50_s', 0):>9.3f} {m.get('ttft_p99_s', 0):>9.3f} {m.get('latency_p50_s', 0):>8.2f} "
                f"{m.get('latency_p99_s', 0):>8.2f}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--concurrency", default="1,4,16,64", help="comma-separated N")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument(
        "--slides-root", type=Path, help="slides the server reads (default: a generated demo world)"
    )
    ap.add_argument(
        "--slide", action="append", help="slide under --slides-root (repeatable; default: all found)"
    )
    ap.add_argument("--server", help="use this running server instead of starting one")
    ap.add_argument("--token-file", type=Path)
    ap.add_argument("--cache", type=Path, help="the started server's --cache")
    ap.add_argument("--server-log", type=Path, help="the started server's output (default: in a temp folder)")
    ap.add_argument(
        "--server-log-level",
        default="info",
        choices=("debug", "info", "warning"),
        help="the started server's --log-level (debug: where each answer's time to first token goes)",
    )
    ap.add_argument("--start-timeout", type=float, default=300)
    ap.add_argument("--timeout", type=float, default=900, help="seconds per request")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--summary", type=Path, default=RESULTS / "summary.json")
    ap.add_argument("--no-summary", action="store_true")
    args = ap.parse_args()
    args.concurrency = [int(v) for v in args.concurrency.split(",")]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    root = args.slides_root or work / "slides"
    slides = args.slide or (make_world(root) if args.slides_root is None else
                            sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.suffix in (".tif", ".tiff", ".svs")))  # fmt: skip
    dims = slide_dims(root, slides)
    token = read_token(args.token_file) if args.token_file else None
    proc = None
    url = args.server
    if url is None:
        proc, url = start_server(args, root, args.server_log or work / "server.log")
    try:
        logger.info("server %s; warming (features of %d slides, decoder)", url, len(slides))
        client = ServerClient(url, token=token, timeout=args.timeout)
        # every slide, whole and region: both modes then find the same slide-encoder outputs memoised
        warm_reqs = requests_for(3 * len(slides), slides, dims)
        warm = run_mode(client, warm_reqs, False)
        warm.pop("texts")
        if warm["ok"] != len(warm_reqs):
            raise SystemExit(f"warm-up failed: {warm['errors']}")
        rows = []
        for n in args.concurrency:
            reqs = requests_for(n, slides, dims)
            for r in reqs:
                r["max_new_tokens"] = args.max_new_tokens
            seq = run_mode(client, reqs, False)
            con = run_mode(client, reqs, True)
            row = {"n": n, "sequential": seq, "concurrent": con}
            if seq["tokens_per_s"] and con["tokens_per_s"]:
                row["ratio"] = round(con["tokens_per_s"] / seq["tokens_per_s"], 3)
            # greedy: the batched answers are the answers given one at a time
            row["same_answers_as_sequential"] = seq.pop("texts") == con.pop("texts")
            rows.append(row)
            logger.info("N=%d: sequential %.1f tok/s, concurrent %.1f tok/s", n, seq["tokens_per_s"] or 0,
                        con["tokens_per_s"] or 0)  # fmt: skip
        info = machine(client)
        client.close()
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    result = {
        "config": {
            "model": args.model,
            "device": args.device,
            "max_new_tokens": args.max_new_tokens,
            "max_batch": args.max_batch,
            "slides": slides,
            "evidence": False,
            "temperature": 0,
        },  # fmt: skip
        "machine": info,
        "rows": rows,
    }
    print_table(result)
    gpu = args.device.startswith("cuda")
    out = args.out or RESULTS / ("serve_gpu.json" if gpu else "serve_cpu.json")
    write_json(out, result)
    by_n = {r["n"]: r for r in rows}
    if not args.no_summary and 16 in by_n and by_n[16].get("ratio"):
        card = info.get("gpu") if gpu else "cpu"
        keys = (
            {
                "serve_16_vs_sequential": by_n[16]["ratio"],
                "serve_p99_ttft_s": by_n[16]["concurrent"]["ttft_p99_s"],
            }
            if gpu
            else {"serve_cpu_16_vs_sequential": by_n[16]["ratio"]}
        )
        merge_summary(args.summary, keys | {f"{k}_card": card for k in keys})
    logger.info("wrote %s", out)


if __name__ == "__main__":
    main()
