"""``evaluate``: score answers against a bench (accuracy, NLU, WSI-P / WSI-R, leakage subset) and write the report."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from wsi_llava.atomic import atomic_write_text
from wsi_llava.eval.accuracy import close_accuracy
from wsi_llava.eval.bench import Bench, BenchItem, load_train_slides
from wsi_llava.eval.judges.base import CachedJudge, JudgeError
from wsi_llava.eval.nlu import NluScores, nlu_scores
from wsi_llava.eval.report import EvalScores, SubsetScores, table2, table3, write_report
from wsi_llava.eval.wsi_metrics import (
    MetricAggregate,
    PartialScores,
    QuestionScore,
    WsiScorer,
    aggregate,
    score_open,
)
from wsi_llava.progress import CancelToken, ProgressCallback, no_progress

logger = logging.getLogger(__name__)


def nlu_per_task(
    items: Iterable[BenchItem], answers: Mapping[tuple[str, str], str], tasks: Iterable[str] | None = None
) -> dict[str, NluScores]:
    """NLU scores per open task (``tasks`` limits which; the report task is Table 3's)."""
    pairs: dict[str, list[tuple[str, str]]] = defaultdict(list)
    wanted = set(tasks) if tasks is not None else None
    for it in items:
        if not it.close and it.key in answers and (wanted is None or it.task in wanted):
            pairs[it.task].append((it.answer, answers[it.key]))
    out = {}
    for task, p in pairs.items():
        scores = nlu_scores(p)
        if scores is not None:
            out[task] = scores
    return out


def evaluate(
    bench: Bench,
    answers: Mapping[tuple[str, str], str],
    out: str | Path,
    *,
    bench_path: str = "",
    predictions_info: dict[str, Any] | None = None,
    scorer: WsiScorer | None = None,
    text_only: Mapping[tuple[str, str], str] | None = None,
    nlu_tasks: Iterable[str] | None = ("1_Report",),
    train: Iterable[str | Path] = (),
    model: str | None = None,
    baseline: str | None = None,
    decoding: dict[str, Any] | None = None,
    progress: ProgressCallback = no_progress,
    cancel: CancelToken | None = None,
) -> EvalScores:
    """Compute every metric and write ``scores.json`` / ``report.md`` / ``radar.png`` into ``out``.

    If the judge fails part-way, the finished judgements are kept, the report is written with status
    ``incomplete`` and the ``PartialScores`` error is raised again (a re-run reuses the judge cache).
    """
    items = bench.items
    answered = [it for it in items if it.key in answers]
    info = dict(predictions_info or {})
    info.setdefault("n", len(answered))
    info.setdefault("missing", len(items) - len(answered))
    info.setdefault("unmatched", [])
    s = EvalScores(
        bench={
            "path": bench_path,
            "files": bench.files,
            "n_items": len(items),
            "n_open": sum(1 for i in items if not i.close),
            "n_close": sum(1 for i in items if i.close),
        },
        predictions=info,
        model=model,
        baseline=baseline,
        decoding=decoding,
    )
    acc = close_accuracy(items, answers, text_only_answers=text_only)
    acc.parsed = {}
    s.accuracy = acc if acc.pooled else None
    s.nlu = nlu_per_task(items, answers, nlu_tasks)
    error: JudgeError | None = None
    qscores: list[QuestionScore] = []
    if scorer is not None:
        judge = scorer.judge
        try:
            qscores = score_open(items, answers, scorer, progress=progress, cancel=cancel)
        except PartialScores as e:
            error, qscores = e, e.scores
            s.status = f"incomplete: {e}"
        s.judge = {
            "name": judge.name,
            "prompts": scorer.prompts.source,
            "unsupported": scorer.unsupported,
            "parse_retries": scorer.parse_retries,
            "calls": getattr(judge, "calls", None),
            "cache_hits": judge.cache.hits if isinstance(judge, CachedJudge) else None,
        }
        open_answered = [it for it in answered if not it.close]
        if open_answered:
            s.wsi_precision = aggregate(qscores, open_answered, "precision")
            s.wsi_relevance = aggregate(qscores, open_answered, "relevance")
        if error is None:
            unscored = _unscored(judge, s.wsi_precision, s.wsi_relevance)
            if unscored is not None:
                error = JudgeError(unscored)
                s.status = f"failed: {unscored}"
    s.table2 = table2(s.accuracy, s.wsi_precision, s.wsi_relevance)
    s.table3 = table3(s.nlu, s.wsi_precision, s.wsi_relevance)
    train = [str(t) for t in train]
    if train:
        s.slide_disjoint = slide_disjoint(bench, answers, train, qscores, text_only)
    out = Path(out)
    write_report(s, out)
    if qscores:
        _write_judgements(out / "judgements.jsonl", qscores)
    if error is not None:
        raise error
    return s


def _unscored(judge: Any, p: MetricAggregate | None, r: MetricAggregate | None) -> str | None:
    """Why WSI-P or WSI-R has no value although questions were judged (None: each has one)."""
    names = []
    for name, agg in (("WSI-P", p), ("WSI-R", r)):
        if agg is not None and agg.overall.n == 0 and agg.overall.failures > 0:
            kinds = ", ".join(f"{k}: {v}" for k, v in agg.failures.items())
            names.append(f"{name} (all {agg.overall.failures} questions failed; {kinds})")
    if not names:
        return None
    url = getattr(getattr(judge, "judge", judge), "url", None)
    cache = getattr(getattr(judge, "cache", None), "folder", None)
    return (
        f"judge {judge.name}" + (f" at {url}" if url else "") + f" gave no usable reply for "
        f"{' and '.join(names)}" + (f"; its replies are in {cache}" if cache else "") + ". Use a judge that "
        "follows the prompts' JSON format, or adapt the prompts with --prompts"
    )


def slide_disjoint(
    bench: Bench,
    answers: Mapping[tuple[str, str], str],
    train: list[str],
    qscores: list[QuestionScore],
    text_only: Mapping[tuple[str, str], str] | None = None,
) -> SubsetScores:
    """The same metrics restricted to test questions whose slide is in no training file."""
    train_slides = load_train_slides(train)
    test_slides = {it.slide for it in bench.items}
    subset = [it for it in bench.items if it.slide not in train_slides]
    keys = {it.key for it in subset}
    sub_answers = {k: v for k, v in answers.items() if k in keys}
    # the majority answer stays the one of the whole file: the subset is a filter, not a new bench
    acc = close_accuracy(
        subset, sub_answers, text_only_answers=text_only, majority_from=[i for i in bench.items if i.close]
    )
    acc.parsed = {}
    res = SubsetScores(
        train_sources=train,
        train_slides=len(train_slides),
        test_slides=len(test_slides),
        disjoint_slides=len({it.slide for it in subset}),
        n_items=len(subset),
        accuracy=acc if acc.pooled else None,
    )
    open_sub = [it for it in subset if not it.close and it.key in answers]
    if qscores and open_sub:
        res.wsi_precision = aggregate(qscores, open_sub, "precision")
        res.wsi_relevance = aggregate(qscores, open_sub, "relevance")
    return res


def _write_judgements(path: Path, qscores: list[QuestionScore]) -> None:
    atomic_write_text(
        path,
        "".join(q.model_dump_json() + "\n" for q in sorted(qscores, key=lambda q: (q.task, q.id, q.metric))),
    )
