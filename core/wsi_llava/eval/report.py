"""``scores.json``, ``report.md`` (laid out like the paper's Tables 2 and 3) and ``radar.png``."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from wsi_llava.atomic import atomic_write_bytes, atomic_write_text
from wsi_llava.eval import paper
from wsi_llava.eval.accuracy import AccuracyCell, AccuracyReport
from wsi_llava.eval.nlu import NluScores
from wsi_llava.eval.tasks import CAPABILITIES, KNOWN_TASKS, REPORT
from wsi_llava.eval.wsi_metrics import MetricAggregate

logger = logging.getLogger(__name__)

NLU_KEYS = ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "meteor")


class SubsetScores(BaseModel):
    """Scores on the slide-disjoint subset (test slides that appear in no training file)."""

    train_sources: list[str]
    train_slides: int
    test_slides: int
    disjoint_slides: int
    n_items: int
    accuracy: AccuracyReport | None = None
    wsi_precision: MetricAggregate | None = None
    wsi_relevance: MetricAggregate | None = None


class EvalScores(BaseModel):
    """Every number of one evaluation run (written as ``scores.json``)."""

    status: str = "complete"
    bench: dict[str, Any]
    predictions: dict[str, Any]
    model: str | None = None
    baseline: str | None = None
    decoding: dict[str, Any] | None = None
    judge: dict[str, Any] | None = None
    accuracy: AccuracyReport | None = None
    wsi_precision: MetricAggregate | None = None
    wsi_relevance: MetricAggregate | None = None
    nlu: dict[str, NluScores] = Field(default_factory=dict, description="task -> mean NLU scores")
    table2: dict[str, Any] = Field(default_factory=dict)
    table3: dict[str, Any] = Field(default_factory=dict)
    slide_disjoint: SubsetScores | None = None


def table2(
    acc: AccuracyReport | None, p: MetricAggregate | None, r: MetricAggregate | None
) -> dict[str, Any]:
    """Capability -> {wsi_p, wsi_r, acc} plus ``average`` = mean of the 9 cells (None if any is missing)."""
    out: dict[str, Any] = {}
    cells: list[float | None] = []
    for cap in CAPABILITIES:
        row = {
            "wsi_p": p.per_capability[cap].mean if p and cap in p.per_capability else None,
            "wsi_r": r.per_capability[cap].mean if r and cap in r.per_capability else None,
            "acc": acc.per_capability[cap].accuracy if acc and cap in acc.per_capability else None,
            "acc_majority": acc.per_capability[cap].majority if acc and cap in acc.per_capability else None,
        }
        out[cap] = row
        cells += [row["wsi_p"], row["wsi_r"], row["acc"]]
    out["average"] = sum(cells) / 9 if all(c is not None for c in cells) else None  # type: ignore[arg-type]
    return out


def table3(nlu: dict[str, NluScores], p: MetricAggregate | None, r: MetricAggregate | None) -> dict[str, Any]:
    """Report generation: BLEU-1..4, ROUGE-L, METEOR, WSI-P, WSI-R."""
    rep = next((v for t, v in nlu.items() if t == "1_Report"), None)
    out: dict[str, Any] = {k: getattr(rep, k) if rep else None for k in NLU_KEYS}
    out["n"] = rep.n if rep else 0
    out["wsi_precision"] = p.report.mean if p and p.report else None
    out["wsi_relevance"] = r.report.mean if r and r.report else None
    return out


def _f(v: float | None, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _pr_rows(s: EvalScores, level: str) -> list[tuple[str, str]]:
    """``(key, "WSI-P | n | WSI-R | n")`` for every key of ``level`` (``per_task``, ``per_metadata``) that
    either metric scored, in the order they list them."""
    tables = [getattr(agg, level) if agg else {} for agg in (s.wsi_precision, s.wsi_relevance)]
    rows = []
    for key in dict.fromkeys(k for t in tables for k in t):
        cells = [t.get(key) for t in tables]
        rows.append((key, " | ".join(f"{_f(c.mean if c else None)} | {c.n if c else 0}" for c in cells)))
    return rows


def _title(task: str) -> str:
    info = KNOWN_TASKS.get(task)
    return info.title if info else task.replace("_", " ")


def _acc_rows(name: str, cell: AccuracyCell) -> str:
    return f"| {name} | {cell.n} | {_f(cell.accuracy)} | {_f(cell.majority)} | {_f(cell.text_only)} | {cell.unparsed} |"


def render_markdown(s: EvalScores) -> str:
    """The human-readable report: paper-style tables with the paper's WSI-LLaVA row beside ours."""
    ours = "majority class" if s.baseline == "majority" else s.model or s.baseline or "predictions"
    judge = s.judge["name"] if s.judge else None
    lines = [
        "# WSI-Bench evaluation",
        "",
        f"- status: **{s.status}**",
        f"- bench: `{s.bench.get('path')}` ({s.bench.get('n_items')} questions: "
        f"{s.bench.get('n_open')} open, {s.bench.get('n_close')} close-ended)",
        f"- predictions: {s.predictions.get('source')} ({s.predictions.get('n')} answered, "
        f"{s.predictions.get('missing')} questions without an answer, {len(s.predictions.get('unmatched', []))} "
        "rows matching no question"
        + (
            f", {s.predictions['duplicates']} duplicate rows: the last one of each question is scored"
            if s.predictions.get("duplicates")
            else ""
        )
        + ")",
        f"- model: {s.model or '–'}" + (f" (baseline: {s.baseline})" if s.baseline else ""),
        f"- decoding: {json.dumps(s.decoding) if s.decoding else '–'}",
        f"- judge: {judge or 'none (WSI-P / WSI-R not computed)'}"
        + (
            f"; prompts: {s.judge['prompts']}; unsupported claims: {s.judge['unsupported']}"
            if s.judge
            else ""
        ),
        "",
        "Paper numbers: WSI-LLaVA row of the paper's Tables 2 and 3 (arXiv 2412.02141, v1 figures). "
        "Absolute WSI-P / WSI-R depend on the judge model and prompts.",
        "",
        "## Table 2: capabilities",
        "",
        "| Model | Morph. WSI-P | Morph. WSI-R | Morph. Acc | Diag. WSI-P | Diag. WSI-R | Diag. Acc "
        "| Treat. WSI-P | Treat. WSI-R | Treat. Acc | Average |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    t2 = s.table2
    cells = []
    for cap in CAPABILITIES:
        row = t2.get(cap, {})
        cells += [_f(row.get("wsi_p")), _f(row.get("wsi_r")), _f(row.get("acc"))]
    lines.append(f"| {ours} | " + " | ".join(cells) + f" | {_f(t2.get('average'))} |")
    if s.baseline != "majority":  # the majority baseline's own row already is the majority class
        maj = [_f(t2.get(cap, {}).get("acc_majority")) for cap in CAPABILITIES]
        lines.append(f"| majority class | – | – | {maj[0]} | – | – | {maj[1]} | – | – | {maj[2]} | – |")
    pc = []
    for cap in CAPABILITIES:
        pc += [_f(v) for v in paper.TABLE2[cap]]
    lines.append("| WSI-LLaVA (paper) | " + " | ".join(pc) + f" | {_f(paper.TABLE2_AVERAGE)} |")
    lines += [
        "",
        "WSI-P / WSI-R per capability: macro average over its open tasks; Acc: pooled over its close-ended "
        "files; Average: mean of the 9 cells (– when a cell is missing).",
        "",
    ]
    if s.accuracy and s.accuracy.pooled:
        lines += [
            "## Close-ended accuracy",
            "",
            "| file / group | n | accuracy | majority class | text-only | unparsed |",
            "|---|---|---|---|---|---|",
        ]
        for t, c in s.accuracy.per_task.items():
            lines.append(_acc_rows(t, c))
        for cap, c in s.accuracy.per_capability.items():
            lines.append(_acc_rows(f"**{cap}** (pooled)", c))
        lines.append(_acc_rows("**all close-ended** (pooled)", s.accuracy.pooled))
        lines += [
            "",
            "Majority class: each file's most frequent answer, on the same rows. Text-only: the model "
            "with zeroed visual tokens (– when not run).",
            "",
        ]
    t3 = s.table3
    lines += [
        "## Table 3: report generation",
        "",
        "| Model | n | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | ROUGE-L | METEOR | WSI-Precision | WSI-Relevance |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {ours} | {t3.get('n', 0)} | "
        + " | ".join(_f(t3.get(k), 4) for k in (*NLU_KEYS, "wsi_precision", "wsi_relevance"))
        + " |",
        "| WSI-LLaVA (paper) | 208 | "
        + " | ".join(_f(paper.TABLE3[k], 4) for k in (*NLU_KEYS, "wsi_precision", "wsi_relevance"))
        + " |",
        "",
    ]
    if s.nlu:
        variant = next(iter(s.nlu.values())).meteor_variant
        lines += [
            f"METEOR: {variant}. BLEU: sentence-level, cumulative, smoothing method 4, mean over samples.",
            "",
        ]
    lines += [
        "A constant template answer (the majority baseline's one report for every slide) outscores the "
        "paper's row on BLEU / ROUGE-L / METEOR, because these n-gram metrics reward the template text "
        "that all reports share; WSI-P / WSI-R score the findings.",
        "",
    ]
    if s.wsi_precision or s.wsi_relevance:
        lines += [
            "## WSI-Precision / WSI-Relevance per task",
            "",
            "| task | capability | WSI-P | n | WSI-R | n | paper WSI-P (radar, ±0.03) | paper WSI-R (radar) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for t, pr in _pr_rows(s, "per_task"):
            ref = paper.RADAR.get(t, (None, None))
            cap = KNOWN_TASKS[t].capability if t in KNOWN_TASKS else ""
            lines.append(f"| {_title(t)} | {cap} | {pr} | {_f(ref[0], 2)} | {_f(ref[1], 2)} |")
        lines += [
            "",
            "### per metadata type",
            "",
            "| metadata | WSI-P | n | WSI-R | n |",
            "|---|---|---|---|---|",
        ]
        for m, pr in _pr_rows(s, "per_metadata"):
            lines.append(f"| {m} | {pr} |")
        lines += ["", "### judge replies that could not be scored", ""]
        for name, agg in (("WSI-P", s.wsi_precision), ("WSI-R", s.wsi_relevance)):
            if agg is not None:
                fails = ", ".join(f"{k}: {v}" for k, v in agg.failures.items()) or "none"
                lines.append(f"- {name}: {agg.overall.n} scored, {agg.overall.failures} not scored ({fails})")
        lines.append("")
    d = s.slide_disjoint
    if d is not None:
        lines += [
            "## Leakage control: slide-disjoint subset",
            "",
            f"Test questions whose slide appears in no training file ({', '.join(d.train_sources)}; "
            f"{d.train_slides} training slides): {d.disjoint_slides} of {d.test_slides} test slides, "
            f"{d.n_items} questions.",
            "",
            "| subset | close-ended acc (n) | majority | WSI-P (n) | WSI-R (n) |",
            "|---|---|---|---|---|",
        ]

        def row(
            name: str, acc: AccuracyReport | None, p: MetricAggregate | None, r: MetricAggregate | None
        ) -> str:
            a = acc.pooled if acc else None
            return (
                f"| {name} | {_f(a.accuracy if a else None)} ({a.n if a else 0}) | {_f(a.majority if a else None)} | "
                f"{_f(p.overall.mean if p else None)} ({p.overall.n if p else 0}) | "
                f"{_f(r.overall.mean if r else None)} ({r.overall.n if r else 0}) |"
            )

        lines.append(row("all test questions", s.accuracy, s.wsi_precision, s.wsi_relevance))
        lines.append(row("slide-disjoint", d.accuracy, d.wsi_precision, d.wsi_relevance))
        lines.append("")
    return "\n".join(lines)


def plot_radar(s: EvalScores, path: Path) -> bool:
    """Per-task WSI-P and WSI-R on a radar chart (paper's digitised values dashed); False if nothing to plot."""
    p, r = s.wsi_precision, s.wsi_relevance
    tasks = [
        t
        for t in dict.fromkeys([*(p.per_task if p else {}), *(r.per_task if r else {})])
        if (KNOWN_TASKS[t].capability if t in KNOWN_TASKS else "") != REPORT and t != "1_Report"
    ]
    if not tasks:
        return False
    order = list(KNOWN_TASKS)
    tasks.sort(
        key=lambda t: order.index(t) if t in order else len(order)
    )  # grouped by capability, as the paper
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(tasks)
    angles = np.linspace(0, 2 * np.pi, n, endpoint=False).tolist()
    closed = [*angles, angles[0]]

    def values(agg: MetricAggregate | None, idx: int | None = None) -> list[float]:
        if idx is not None:
            v = [paper.RADAR.get(t, (np.nan, np.nan))[idx] for t in tasks]
        else:
            v = [
                (
                    agg.per_task[t].mean
                    if agg and t in agg.per_task and agg.per_task[t].mean is not None
                    else np.nan
                )
                for t in tasks
            ]
        return [*v, v[0]]

    fig, axes = plt.subplots(1, 2, figsize=(13, 6.2), subplot_kw={"projection": "polar"})
    for ax, (label, agg, idx, colour) in zip(
        axes, (("WSI-Precision", p, 0, "tab:red"), ("WSI-Relevance", r, 1, "tab:blue")), strict=True
    ):
        ours = values(agg)
        ax.plot(closed, ours, color=colour, linewidth=2, label=s.model or s.baseline or "ours")
        ax.fill(closed, np.nan_to_num(ours), color=colour, alpha=0.15)
        ref = values(None, idx)
        if not all(np.isnan(ref)):
            ax.plot(
                closed, ref, color="grey", linestyle="--", linewidth=1.2, label="WSI-LLaVA (paper, digitised)"
            )
        ax.set_xticks(angles)
        ax.set_xticklabels([_title(t).replace(" ", "\n", 1) for t in tasks], fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_rlabel_position(180 / n)
        ax.set_yticks([0.2, 0.4, 0.6, 0.8, 1.0])
        ax.set_yticklabels(["0.2", "0.4", "0.6", "0.8", "1.0"], fontsize=7)
        ax.set_title(label, pad=18)
        ax.legend(loc="lower center", bbox_to_anchor=(0.5, -0.22), fontsize=8, frameon=False)
    judge = s.judge["name"] if s.judge else "no judge"
    fig.suptitle(f"Per-task WSI-P / WSI-R (judge: {judge})", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return True


def write_report(s: EvalScores, out: str | Path) -> dict[str, Path]:
    """Write ``scores.json``, ``report.md`` and (when a judge gave per-task WSI-P/R) ``radar.png`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"scores": out / "scores.json", "report": out / "report.md"}
    atomic_write_text(paths["scores"], s.model_dump_json(indent=1))
    atomic_write_text(paths["report"], render_markdown(s))
    radar = out / "radar.png"
    if plot_radar(s, radar):
        paths["radar"] = radar
    elif radar.is_file():  # an earlier scoring's chart would sit beside scores that lack its numbers
        radar.unlink()
    return paths
