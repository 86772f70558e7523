"""CPU benchmark of ``wsi-llava ask`` with the demo model on the demo's synthetic world slide.

    python benchmarks/bench_cpu_ask.py [--quick] [--out results/decode_cpu_ask.json] [--workdir DIR]

* cold: wall time of the whole CLI process (``wsi-llava ask SLIDE QUESTION --device cpu``), features
  already cached (one untimed run first fills the cache), ``--cold`` runs;
* warm: one ``SlideSession`` in this process, ``ask`` repeated ``--warm`` times, with the eager decode
  loop and with the static fast-decode step (``fast_decode=True``; off by default on CPU);
* the 1-minute load average before and after, since this machine is shared.

Uses ``$WSI_LLAVA_CACHE`` = ``--workdir`` (the converted LLM is linked from the default cache when there).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "decode_cpu_ask.json"
QUESTION = "What tissue types are present, and what is the diagnosis?"


def _prepare_cache(workdir: Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "wsi-llava" / "llm"
    if default.is_dir() and not (workdir / "llm").exists():
        (workdir / "llm").symlink_to(default, target_is_directory=True)


def _demo_label() -> str:
    """Which demo runs: the shipped trained checkpoint, or the seeded untrained fallback."""
    from wsi_llava.model.demo import DEMO_WEIGHTS

    if (DEMO_WEIGHTS / "wsi_llava.json").is_file():
        return f"demo (SmolLM2-135M-Instruct + trained checkpoint {DEMO_WEIGHTS.name}/)"
    return "demo (SmolLM2-135M-Instruct + untrained demo encoder/projector)"


def _cli(slide: Path, env: dict, max_new: int) -> tuple[float, dict]:
    exe = shutil.which("wsi-llava") or str(Path(sys.executable).with_name("wsi-llava"))
    launcher = [exe] if Path(exe).is_file() else [sys.executable, "-m", "wsi_llava.cli"]
    cmd = [*launcher, "ask", str(slide), QUESTION, "--device", "cpu", "--json"]
    cmd += ["--max-new-tokens", str(max_new)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"wsi-llava ask failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return wall, json.loads(done.stdout[done.stdout.index("{") :])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/wsi_llava_bench_ask"))
    ap.add_argument("--cold", type=int, default=3)
    ap.add_argument("--warm", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args(argv)
    cold_n, warm_n = (1, 2) if args.quick else (args.cold, args.warm)

    _prepare_cache(args.workdir)
    os.environ["WSI_LLAVA_CACHE"] = str(args.workdir)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.pop("WSI_LLAVA_FAST_DECODE", None)
    env = dict(os.environ)

    import torch
    import transformers

    from wsi_llava.demo import demo_world
    from wsi_llava.synth import load_manifest

    res: dict = {
        "benchmark": "cpu_ask",
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "model": _demo_label(),
        "question": QUESTION,
        "max_new_tokens": args.max_new_tokens,
        "load_avg_1min_before": round(os.getloadavg()[0], 2),
    }
    world = demo_world()
    manifest = load_manifest(world)
    slide = world / manifest.slides[0].path
    res["slide"] = slide.name

    t0 = time.perf_counter()
    first_wall, first = _cli(slide, env, args.max_new_tokens)  # fills the feature cache
    res["first_cli_run_seconds"] = round(first_wall, 2)
    res["first_cli_run_timings"] = first.get("timings")
    colds = [_cli(slide, env, args.max_new_tokens) for _ in range(cold_n)]
    res["cold_cli_seconds"] = [round(w, 2) for w, _ in colds]
    res["cold_cli_median_seconds"] = round(statistics.median(w for w, _ in colds), 2)
    res["cold_cli_answer_timings"] = colds[-1][1].get("timings")

    from wsi_llava.session import SlideSession

    t_open = time.perf_counter()
    with SlideSession(slide, "demo", device="cpu") as session:
        session.extract()
        res["warm_session_open_seconds"] = round(time.perf_counter() - t_open, 2)
        res["warm"] = {}
        for label, flag in (("eager", False), ("fast_static", True)):
            session.model.fast_decode = flag
            session.ask(QUESTION, max_new_tokens=args.max_new_tokens)  # warm-up
            rows = []
            for _ in range(warm_n):
                t = time.perf_counter()
                ans = session.ask(QUESTION, max_new_tokens=args.max_new_tokens)
                wall = time.perf_counter() - t
                gen = session.model.last_generation
                rows.append(
                    {
                        "seconds": round(wall, 3),
                        "prefill": ans.timings.prefill,
                        "decode": ans.timings.decode,
                        "new_tokens": ans.timings.new_tokens,
                        "decode_tok_s": round((gen.n_new_tokens - 1) / gen.decode_seconds, 1)
                        if gen.decode_seconds > 0 and gen.n_new_tokens > 1
                        else None,
                        "decode_path": gen.decode_path,
                    }
                )
            res["warm"][label] = {
                "median_seconds": statistics.median(r["seconds"] for r in rows),
                "median_decode_tok_s": statistics.median(r["decode_tok_s"] or 0 for r in rows),
                "answer_ids": list(gen.new_token_ids),
                "runs": rows,
            }
        ids = [res["warm"][k].pop("answer_ids") for k in ("eager", "fast_static")]
        res["warm"]["fast_static_ids_equal_eager"] = ids[0] == ids[1]
    res["load_avg_1min_after"] = round(os.getloadavg()[0], 2)
    res["total_seconds"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"{res['machine']}, load {res['load_avg_1min_before']} -> {res['load_avg_1min_after']}")
    print(f"cold CLI (features cached): median {res['cold_cli_median_seconds']} s  {res['cold_cli_seconds']}")
    for label in ("eager", "fast_static"):
        w = res["warm"][label]
        print(
            f"warm ask, {label:<12}: median {w['median_seconds']} s, decode {w['median_decode_tok_s']} tok/s"
        )
    print(f"fast static ids equal eager: {res['warm']['fast_static_ids_equal_eager']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
