"""The ``wsi-llava eval`` command (attach with ``cli.add_command(eval_command)``)."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from wsi_llava.clickutil import cache_option, model_options
from wsi_llava.errors import Cancelled, WsiLlavaError
from wsi_llava.progress import TerminalProgress

logger = logging.getLogger(__name__)


@click.command("eval")
@click.option(
    "--bench",
    "bench_path",
    required=True,
    type=click.Path(path_type=Path),
    help="Bench: folder of *_test.json, one .json/.jsonl file, or a synthetic world folder.",
)
@click.option("--split", default=None, help="Keep only *_<split>.json files of a bench folder (e.g. test).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder for the report.")
@click.option(
    "--predictions",
    type=click.Path(path_type=Path),
    help="Answers: our JSONL, official model_vqa.py JSONL, or WSI-Metric CSV.",
)
@model_options(default=None)
@click.option("--slides", type=click.Path(path_type=Path), help="With --model: folder of the bench's slides.")
@click.option(
    "--features",
    type=click.Path(path_type=Path),
    help="With --model: folder of official .pt visual tokens (576x1024), by the bench 'image' path.",
)
@click.option(
    "--baseline",
    type=click.Choice(["majority", "text-only"]),
    help="Score a baseline instead: each file's majority answer, or the model with zeroed visual tokens.",
)
@click.option(
    "--text-only-column",
    is_flag=True,
    help="With --model: also run the model with zeroed visual tokens on close-ended rows (shown beside accuracy).",
)
@click.option("--tasks", help="Comma-separated task names to keep (file stems, e.g. Grading,1_Report).")
@click.option("--limit", type=int, help="Keep only the first N questions of each task (quick runs).")
@click.option(
    "--judge", "judge_spec", help="KIND:MODEL for WSI-P / WSI-R, e.g. openai:gpt-4o-mini or hf:/path."
)
@click.option(
    "--judge-url", help="Base URL of an OpenAI-compatible server (default https://api.openai.com/v1)."
)
@click.option(
    "--judge-key-env",
    default="OPENAI_API_KEY",
    show_default=True,
    help="Environment variable that holds the judge's API key.",
)
@click.option(
    "--judge-timeout", default=120.0, show_default=True, help="Seconds in all per judge request (a deadline)."
)
@click.option("--judge-retries", default=5, show_default=True, help="Retries on 429 / 5xx / time-outs.")
@click.option("--judge-backoff", default=1.0, show_default=True, help="First back-off in seconds (doubles).")
@click.option("--judge-concurrency", default=4, show_default=True, help="Judge requests in flight at once.")
@click.option(
    "--judge-cache", type=click.Path(path_type=Path), help="Judge call cache (default OUT/judge_cache)."
)
@click.option("--judge-device", default="cpu", show_default=True, help="Device of an hf judge.")
@click.option(
    "--prompts",
    "prompts_dir",
    type=click.Path(path_type=Path),
    help="Folder of prompt .txt files replacing the built-in judge prompts.",
)
@click.option(
    "--unsupported",
    type=click.Choice(["zero", "ignore"]),
    default="zero",
    show_default=True,
    help="WSI-R: claims the ground truth does not address score 0 (paper figure) or are ignored.",
)
@click.option(
    "--parse-retries", default=2, show_default=True, help="Re-asks when a judge reply cannot be read."
)
@click.option(
    "--nlu",
    "nlu_scope",
    type=click.Choice(["report", "open", "none"]),
    default="report",
    show_default=True,
    help="Tasks that get BLEU / ROUGE-L / METEOR: report generation only, every open task, or none.",
)
@click.option(
    "--train",
    "train",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Training files/folders: adds the slide-disjoint subset score (repeatable).",
)
@cache_option("Cache folder (default ~/.cache/wsi-llava), as on ask.")
@click.option("--max-new-tokens", default=512, show_default=True, help="Decoding: answer length limit.")
@click.option("--temperature", default=0.0, show_default=True, help="Decoding: 0 = greedy.")
@click.option("--seed", type=int, default=None, help="Decoding: sampling seed (temperature > 0).")
def eval_command(**kw) -> None:
    """Evaluate on WSI-Bench: accuracy, WSI-Precision / WSI-Relevance, NLU metrics, paper-style report.

    Writes OUT/scores.json, OUT/predictions.jsonl, OUT/report.md and OUT/radar.png (with --judge: per-task
    WSI-P / WSI-R). One OUT holds one run: a model run resumes there with the same model and decoding
    settings only, and no run replaces another run's predictions.jsonl (give another --out).
    """
    bar = TerminalProgress()
    try:
        _run(progress=bar, **kw)
    except Cancelled as e:
        raise click.ClickException(f"cancelled: {e}") from None
    except WsiLlavaError as e:
        raise click.ClickException(str(e)) from None
    finally:
        bar.close()


def _run(progress, **kw) -> None:  # noqa: C901 - one linear recipe
    from wsi_llava.eval.bench import load_bench, load_predictions
    from wsi_llava.eval.runner import (
        Decoding,
        RunInfo,
        check_run,
        majority_predictions,
        prediction_row,
        write_predictions,
    )

    out: Path = kw["out"]
    if out.exists() and not out.is_dir():
        raise WsiLlavaError(
            f"--out {out}: is a file; give a folder for the report (it is created if missing)"
        )
    bench = load_bench(kw["bench_path"], split=kw["split"])
    if kw["tasks"]:
        wanted = {t.strip() for t in kw["tasks"].split(",") if t.strip()}
        from wsi_llava.eval.tasks import canonical_task

        wanted = {canonical_task(t) for t in wanted}
        unknown = wanted - set(bench.tasks())
        if unknown:
            raise WsiLlavaError(
                f"--tasks: {', '.join(sorted(unknown))} not in the bench (has: {', '.join(bench.tasks())})"
            )
        bench.items = [it for it in bench.items if it.task in wanted]
    if kw["limit"]:
        seen: dict[str, int] = {}
        kept = []
        for it in bench.items:
            seen[it.task] = seen.get(it.task, 0) + 1
            if seen[it.task] <= kw["limit"]:
                kept.append(it)
        bench.items = kept

    sources = [n for n in ("predictions", "model") if kw[n]]
    baseline = kw["baseline"]
    if kw["predictions"] and (kw["model"] or baseline):
        raise WsiLlavaError("give either --predictions or --model/--baseline, not both")
    if baseline == "text-only" and not kw["model"]:
        raise WsiLlavaError("--baseline text-only runs the model with zeroed visual tokens: give --model too")
    if not sources and baseline != "majority":
        raise WsiLlavaError(
            "nothing to score: give --predictions FILE, --model (with --slides or --features), or --baseline"
        )
    if kw["model"] and baseline != "text-only" and not (kw["slides"] or kw["features"] or bench.root):
        raise WsiLlavaError(
            "--model needs --slides DIR (our pipeline) or --features DIR (official .pt files)"
        )

    _make_out(out)
    pred_file = out / "predictions.jsonl"
    decoding = Decoding(temperature=kw["temperature"], max_new_tokens=kw["max_new_tokens"], seed=kw["seed"])
    info: dict = {}
    text_only = None
    model_name = None
    if kw["predictions"]:
        preds = load_predictions(kw["predictions"], bench)
        answers = preds.answers
        info = {
            "source": str(kw["predictions"]),
            "unmatched": preds.unmatched,
            "duplicates": preds.duplicates,
        }
        if pred_file.resolve() != Path(kw["predictions"]).resolve():
            run = RunInfo(source="predictions", predictions=str(Path(kw["predictions"]).resolve()))
            by_key = bench.by_key()
            write_predictions(
                pred_file, (prediction_row(by_key[k], a, "predictions") for k, a in answers.items()), run
            )
            info["run"] = run.model_dump(mode="json")
    elif baseline == "majority":
        run = RunInfo(source="majority", baseline="majority")
        answers = majority_predictions(bench.items)
        info = {"source": "majority baseline (each task's most frequent ground-truth answer)"}
        info["run"] = run.model_dump(mode="json")
        write_predictions(
            pred_file, (prediction_row(it, answers[it.key], "majority") for it in bench.items), run
        )
    else:
        from wsi_llava.eval.runner import feature_answerer, run_predictions, slide_answerer
        from wsi_llava.model import load_model
        from wsi_llava.settings import resolve_device, using_cache_dir

        given = Path(kw["model"]).expanduser()
        common = {
            "source": "model",
            "model": str(given.resolve()) if given.exists() else kw["model"],
            "model_base": str(Path(kw["model_base"]).expanduser().resolve()) if kw["model_base"] else None,
            "dtype": kw["dtype"],
            "decoding": decoding,
        }
        if baseline == "text-only":
            run = RunInfo(**common, baseline="text-only", visual="zero")
        else:
            run = RunInfo(**common, visual="features" if kw["features"] else "slides")
        zero_run = RunInfo(**common, baseline="text-only", visual="zero")
        text_only_file = out / "text_only_predictions.jsonl"
        check_run(pred_file, run)  # before loading the model: a refusal costs nothing
        if kw["text_only_column"] and baseline != "text-only":
            check_run(text_only_file, zero_run)
        kw["device"] = resolve_device(kw["device"])
        with using_cache_dir(kw["cache"]):  # a converted LLM lands under --cache too
            model = load_model(
                kw["model"], device=kw["device"], dtype=kw["dtype"], model_base=kw["model_base"]
            )
        model_name = model.spec.name + (" (text-only)" if baseline == "text-only" else "")
        if baseline == "text-only":
            fn = feature_answerer(model, kw["features"] or ".", decoding, zero_visual=True)
        elif kw["features"]:
            fn = feature_answerer(model, kw["features"], decoding)
        else:
            fn = slide_answerer(
                model, bench, kw["slides"], decoding, cache_dir=kw["cache"], device=kw["device"]
            )
        answers = run_predictions(bench.items, pred_file, fn, model_name, progress=progress, run=run)
        info = {"source": f"model {model_name}", "run": run.model_dump(mode="json")}
        if kw["text_only_column"] and baseline != "text-only":
            zero = feature_answerer(model, ".", decoding, zero_visual=True)
            text_only = run_predictions(
                [it for it in bench.items if it.close],
                text_only_file,
                zero,
                model_name + " (text-only)",
                progress=progress,
                run=zero_run,
            )

    scorer = None
    if kw["judge_spec"]:
        from wsi_llava.eval.judges.base import CachedJudge, JudgeCache, make_judge
        from wsi_llava.eval.wsi_metrics import WsiScorer, load_prompts

        prompts = load_prompts(kw["prompts_dir"])
        judge = make_judge(
            kw["judge_spec"],
            url=kw["judge_url"],
            key_env=kw["judge_key_env"],
            timeout=kw["judge_timeout"],
            retries=kw["judge_retries"],
            backoff=kw["judge_backoff"],
            concurrency=kw["judge_concurrency"],
            device=kw["judge_device"],
        )
        cache = JudgeCache(kw["judge_cache"] or out / "judge_cache")
        scorer = WsiScorer(
            CachedJudge(judge, cache),
            prompts,
            unsupported=kw["unsupported"],
            parse_retries=kw["parse_retries"],
        )

    from wsi_llava.eval.pipeline import evaluate

    nlu_tasks = {"report": ("1_Report",), "open": None, "none": ()}[kw["nlu_scope"]]
    scores = evaluate(
        bench,
        answers,
        out,
        bench_path=str(kw["bench_path"]),
        predictions_info=info,
        scorer=scorer,
        text_only=text_only,
        nlu_tasks=nlu_tasks,
        train=kw["train"],
        model=model_name,
        baseline=baseline,
        decoding=decoding.model_dump() if kw["model"] else None,
        progress=progress,
    )
    click.echo(_summary(scores, out))


def _make_out(out: Path) -> None:
    """Create the output folder, or say in one line why it cannot be."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WsiLlavaError(f"--out {out}: cannot create the folder ({e.strerror or e})") from None


def _summary(s, out: Path) -> str:
    lines = [
        f"wrote {out / 'scores.json'}, {out / 'report.md'}"
        + (f", {out / 'radar.png'}" if (out / "radar.png").exists() else "")
        + (" (radar.png needs --judge)" if s.judge is None else "")
    ]
    if s.accuracy and s.accuracy.pooled:
        p = s.accuracy.pooled
        lines.append(f"close-ended accuracy {p.accuracy:.3f} (majority class {p.majority:.3f}, n={p.n})")
    for name, agg in (("WSI-P", s.wsi_precision), ("WSI-R", s.wsi_relevance)):
        if agg is not None and agg.overall.mean is not None:
            lines.append(
                f"{name} {agg.overall.mean:.3f} (n={agg.overall.n}, not scored {agg.overall.failures})"
            )
    rep = s.nlu.get("1_Report")
    if rep is not None:
        lines.append(
            f"report BLEU-4 {rep.bleu4:.4f} ROUGE-L {rep.rouge_l:.4f} METEOR {rep.meteor:.4f} (n={rep.n})"
        )
    return "\n".join(lines)
