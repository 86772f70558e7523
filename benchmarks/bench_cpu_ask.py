"""CPU benchmark of ``wsi-llava ask`` with the demo model, this code against a baseline checkout in the same run.

    git worktree add --detach /tmp/wsi_llava_base 7d15c0a    # the code to compare against
    python benchmarks/bench_cpu_ask.py --baseline /tmp/wsi_llava_base [--quick] [--out FILE] [--workdir DIR]

On the demo's synthetic world slide, features cached (one untimed run first fills the cache), evidence on:

* cold: wall time of a fresh CLI process as a user types it, ``wsi-llava ask SLIDE QUESTION`` (no flags:
  the default device, evidence and decoding), ``--cold`` runs per code tree, the trees interleaved;
* warm: a child process per tree opens one ``SlideSession`` and times ``ask`` ``--warm`` times (after one
  warm-up), with the answer's own timings (prefill, decode, the evidence pass); ``--warm-rounds`` such
  sessions per tree, the trees taking turns;
* the answers (text, token ids) and evidence scores of both trees, compared;
* the 1-minute load average around every run, since this machine is shared; medians are reported.

Each tree runs as ``python -m wsi_llava.cli`` with its own ``core/`` first on ``PYTHONPATH``. Uses
``$WSI_LLAVA_CACHE`` = ``--workdir`` (the converted LLM is linked from the default cache when there).
Writes ``benchmarks/results/decode_cpu_ask.json`` and ``cpu_ask_cold_s`` / ``cpu_ask_warm_s`` (this tree's
medians) into ``benchmarks/results/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "decode_cpu_ask.json"
SUMMARY = HERE / "results" / "summary.json"
QUESTION = "What tissue types are present, and what is the diagnosis?"
CARD = f"cpu ({os.cpu_count()} cores)"


def _prepare_cache(workdir: Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "wsi-llava" / "llm"
    if default.is_dir() and not (workdir / "llm").exists():
        (workdir / "llm").symlink_to(default, target_is_directory=True)


def _env(tree: Path) -> dict[str, str]:
    """The environment that runs ``tree``'s code (its ``core/`` and frontends first on the path)."""
    env = dict(os.environ)
    # bytecode cached as on a user's machine (the untimed first run writes it), not recompiled every run
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    paths = [tree / "core", tree, tree / "qupath_ext"]
    env["PYTHONPATH"] = os.pathsep.join([str(p) for p in paths] + [env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    return env


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _cli(tree: Path, slide: Path) -> dict[str, Any]:
    """One fresh ``wsi-llava ask SLIDE QUESTION`` process of ``tree``: wall seconds, its answer text, load."""
    load = _load()
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "wsi_llava.cli", "ask", str(slide), QUESTION]
    done = subprocess.run(cmd, env=_env(tree), capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{tree}: wsi-llava ask failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return {
        "seconds": round(wall, 2),
        "answer": done.stdout.strip(),
        "load_before": load,
        "load_after": _load(),
    }


def _warm_child(slide: Path, runs: int) -> None:
    """(In the child) one session, ``ask`` timed ``runs`` times after a warm-up; JSON on stdout."""
    from wsi_llava.session import SlideSession

    t0 = time.perf_counter()
    with SlideSession(slide, "demo") as session:
        session.extract()
        opened = time.perf_counter() - t0
        session.ask(QUESTION)  # warm-up
        rows = []
        for _ in range(runs):
            load = _load()
            t = time.perf_counter()
            ans = session.ask(QUESTION)
            wall = time.perf_counter() - t
            tm = ans.timings
            rows.append(
                {
                    "seconds": round(wall, 3),
                    "prefill": tm.prefill,
                    "decode": tm.decode,
                    "evidence": round(wall - tm.features - tm.prefill - tm.decode, 3),
                    "new_tokens": tm.new_tokens,
                    "decode_path": tm.decode_path,
                    "load_before": load,
                }
            )
        gen = session.model.last_generation
    out = {
        "session_open_seconds": round(opened, 2),
        "runs": rows,
        "answer": ans.answer,
        "answer_ids": [int(i) for i in gen.new_token_ids],
        "evidence_scores": ans.evidence.scores,
        "llm_dtype": str(session.model.dtype).removeprefix("torch."),
    }
    print(json.dumps(out))


def _warm(tree: Path, slide: Path, runs: int) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--warm-child", str(slide), "--warm", str(runs)]
    done = subprocess.run(cmd, env=_env(tree), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{tree}: warm session failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _commit(tree: Path) -> str:
    """``tree``'s commit, ``+changes`` when its working tree differs from it."""

    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(tree), *a], capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("+changes" if git("status", "--porcelain", "-uno") else "")


def _median(rows: list[dict[str, Any]], key: str) -> float:
    return round(statistics.median(r[key] for r in rows), 3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", type=Path, help="a checkout of the code to compare against (its core/)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--summary", type=Path, default=SUMMARY)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/wsi_llava_bench_ask"))
    ap.add_argument("--cold", type=int, default=5)
    ap.add_argument("--warm", type=int, default=5, help="timed answers per warm session")
    ap.add_argument(
        "--warm-rounds", type=int, default=2, help="warm sessions per tree, the trees alternating"
    )
    ap.add_argument("--warm-child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.warm_child is not None:
        _warm_child(args.warm_child, args.warm)
        return 0
    cold_n, warm_n = (2, 2) if args.quick else (args.cold, args.warm)
    warm_rounds = 1 if args.quick else args.warm_rounds

    _prepare_cache(args.workdir)
    os.environ["WSI_LLAVA_CACHE"] = str(args.workdir)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.pop("WSI_LLAVA_FAST_DECODE", None)
    import torch
    import transformers

    from wsi_llava.demo import demo_world
    from wsi_llava.model.demo import DEMO_WEIGHTS
    from wsi_llava.settings import cpu_computes_bf16
    from wsi_llava.synth import load_manifest

    world = demo_world()
    slide = world / load_manifest(world).slides[0].path
    trees = {"new": HERE.parent}
    if args.baseline is not None:
        if not (args.baseline / "core" / "wsi_llava").is_dir():
            raise SystemExit(
                f"--baseline {args.baseline}: no core/wsi_llava in it (a checkout of this repository)"
            )
        trees = {"baseline": args.baseline.resolve(), **trees}
    commit = {name: _commit(tree) for name, tree in trees.items()}
    res: dict[str, Any] = {
        "benchmark": "cpu_ask",
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "card": CARD,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_bf16_arithmetic": cpu_computes_bf16(),
        "transformers": transformers.__version__,
        "model": f"demo (SmolLM2-135M-Instruct + trained checkpoint {DEMO_WEIGHTS.name}/)",
        "question": QUESTION,
        "command": f"wsi-llava ask {slide.name} '{QUESTION}'",
        "slide": slide.name,
        "trees": {name: {"path": str(tree), "commit": commit[name]} for name, tree in trees.items()},
        "load_avg_1min_before": _load(),
        "bytecode_cached": True,
        "cold_runs_per_tree": cold_n,
        "warm_sessions_per_tree": warm_rounds,
    }
    t0 = time.perf_counter()
    for tree in trees.values():  # untimed: fills the feature cache (same key) and each tree's bytecode cache
        _cli(tree, slide)
    colds: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    for _ in range(cold_n):  # interleaved, so both trees see the same load over time
        for name, tree in trees.items():
            colds[name].append(_cli(tree, slide))
    warms: dict[str, dict[str, Any]] = {}
    for _ in range(warm_rounds):  # sessions of the trees take turns, as the cold runs do
        for name, tree in trees.items():
            w = _warm(tree, slide, warm_n)
            if name in warms:
                warms[name]["runs"] += w["runs"]
            else:
                warms[name] = w
    res["load_avg_1min_after"] = _load()
    res["total_seconds"] = round(time.perf_counter() - t0, 1)
    for name in trees:
        w = warms[name]
        res[name] = {
            "cold_cli_median_seconds": _median(colds[name], "seconds"),
            "cold_cli_runs": [{k: v for k, v in r.items() if k != "answer"} for r in colds[name]],
            "cold_cli_answer": colds[name][-1]["answer"],
            "warm_session_open_seconds": w["session_open_seconds"],
            "warm_ask_median_seconds": _median(w["runs"], "seconds"),
            "warm_median": {k: _median(w["runs"], k) for k in ("prefill", "decode", "evidence")},
            "warm_runs": w["runs"],
            "answer": w["answer"],
            "answer_ids": w["answer_ids"],
            "evidence_scores": w["evidence_scores"],
            "llm_dtype": w.get("llm_dtype"),
        }
    if "baseline" in trees:
        b, n = res["baseline"], res["new"]
        diff = [abs(x - y) for x, y in zip(b["evidence_scores"], n["evidence_scores"], strict=True)]
        res["same_answer_ids"] = b["answer_ids"] == n["answer_ids"]
        res["same_cold_cli_answer"] = b["cold_cli_answer"] == n["cold_cli_answer"]
        res["evidence_max_abs_diff"] = max(diff)
        res["cold_speedup"] = round(b["cold_cli_median_seconds"] / n["cold_cli_median_seconds"], 2)
        res["warm_speedup"] = round(b["warm_ask_median_seconds"] / n["warm_ask_median_seconds"], 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    sys.path.insert(0, str(HERE))
    from bench_paper_model_cli import merge_summary

    merge_summary(
        args.summary,
        {
            "cpu_ask_cold_s": res["new"]["cold_cli_median_seconds"],
            "cpu_ask_cold_s_card": CARD,
            "cpu_ask_warm_s": res["new"]["warm_ask_median_seconds"],
            "cpu_ask_warm_s_card": CARD,
        },
    )

    print(f"{res['machine']}, load {res['load_avg_1min_before']} -> {res['load_avg_1min_after']}")
    print(
        f"{'':<10} {'cold CLI s':>10} {'warm ask s':>10} {'prefill':>8} {'decode':>8} {'evidence':>8}  tokens"
    )
    for name in trees:
        r, m = res[name], res[name]["warm_median"]
        print(
            f"{name + ' ' + commit[name]:<10} {r['cold_cli_median_seconds']:>10.2f} {r['warm_ask_median_seconds']:>10.2f} "
            f"{m['prefill']:>8.2f} {m['decode']:>8.2f} {m['evidence']:>8.2f}  {len(r['answer_ids'])}"
        )
    if "baseline" in trees:
        print(
            f"speed-up: cold {res['cold_speedup']}x, warm {res['warm_speedup']}x; same answer ids: "
            f"{res['same_answer_ids']}, same CLI text: {res['same_cold_cli_answer']}, "
            f"evidence max |diff|: {res['evidence_max_abs_diff']:.2e}"
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
