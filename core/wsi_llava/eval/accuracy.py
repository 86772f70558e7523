"""Close-ended accuracy: the option letter (A-D) or Yes/No parsed from free text, with majority baselines.

Accuracy is reported per file (task), per capability (pooled over its files) and pooled over all
close-ended rows; the majority-class baseline (each file's most frequent ground-truth answer, ties
broken alphabetically) is computed on exactly the same rows and printed beside every accuracy.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping

from pydantic import BaseModel, Field

from wsi_llava.eval.bench import BenchItem

_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)
_LETTER_PATTERNS = (
    re.compile(r"^\W*([A-D])\W*$", re.IGNORECASE),  # "C", "c.", "(B)"
    re.compile(r"\(([A-D])\)"),  # "(C)"
    re.compile(
        r"\b(?:answer|option|choice)\s*(?:is|:|=)?\s*(?:option\s*)?\(?([A-D])\b(?![-'])", re.IGNORECASE
    ),
    re.compile(r"^\s*([A-D])(?:[.):,]|\s+-|\s*$)"),  # "B) Squamous ...", "B. ...", "B - ..."
    re.compile(r"(?:^|\s)([A-D])\)"),  # "... is B) squamous"
    re.compile(r"(?<![\w'-])([B-D])(?![\w'-])"),  # a lone capital B-D ("A" alone is usually an article)
)


def is_yes_no(answer: str) -> bool:
    return answer.strip().lower() in ("yes", "no")


def parse_choice(text: str, options: Mapping[str, str] | None = None, yes_no: bool = False) -> str | None:
    """The first option letter ``A``-``D`` (or ``Yes``/``No`` when ``yes_no``) stated in ``text``.

    Falls back to the option whose text appears in the answer (the longest one when several do).
    ``None`` when nothing can be read (counted as wrong and reported as unparsed).
    """
    if not text:
        return None
    if yes_no:
        m = _YES_NO.search(text)
        return m.group(1).capitalize() if m else None
    for pat in _LETTER_PATTERNS:
        m = pat.search(text)
        if m:
            return m.group(1).upper()
    if options:
        low = text.lower()
        hits = [(len(v), k) for k, v in options.items() if v and v.lower() in low]
        if hits:
            return max(hits)[1]
    return None


class AccuracyCell(BaseModel):
    """Accuracy of one group of rows with its majority baseline on the same rows."""

    n: int
    correct: int
    accuracy: float | None
    majority: float | None = Field(description="majority-class baseline accuracy on the same rows")
    unparsed: int = Field(0, description="answers from which no option could be read (counted wrong)")
    text_only: float | None = Field(None, description="the model with zeroed visual tokens, same rows")


def majority_answers(items: Iterable[BenchItem]) -> dict[str, str]:
    """Each task's most frequent ground-truth answer (ties: alphabetical)."""
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for it in items:
        counts[it.task][it.answer] += 1
    return {t: sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0][0] for t, c in counts.items()}


def _cell(rows: list[tuple[BenchItem, str | None, str | None, str | None]]) -> AccuracyCell:
    n = len(rows)
    correct = sum(
        1 for it, parsed, _, _ in rows if parsed is not None and parsed.lower() == it.answer.lower()
    )
    maj = sum(1 for it, _, m, _ in rows if m is not None and m.lower() == it.answer.lower())
    unparsed = sum(1 for _, parsed, _, _ in rows if parsed is None)
    text_rows = [(it, t) for it, _, _, t in rows if t is not None]
    text_only = None
    if text_rows and len(text_rows) == n:
        text_only = sum(1 for it, t in text_rows if t.lower() == it.answer.lower()) / n
    return AccuracyCell(
        n=n,
        correct=correct,
        accuracy=correct / n if n else None,
        majority=maj / n if n else None,
        unparsed=unparsed,
        text_only=text_only,
    )


class AccuracyReport(BaseModel):
    """Close-ended accuracy per task (file), per capability (pooled) and over all rows."""

    per_task: dict[str, AccuracyCell]
    per_capability: dict[str, AccuracyCell]
    pooled: AccuracyCell | None
    parsed: dict[str, str | None] = Field(default_factory=dict, description="'task/id' -> option read")


def close_accuracy(
    items: Iterable[BenchItem],
    answers: Mapping[tuple[str, str], str],
    text_only_answers: Mapping[tuple[str, str], str] | None = None,
    majority_from: Iterable[BenchItem] | None = None,
) -> AccuracyReport:
    """Score the close-ended ``items`` that have an answer; baselines use the same rows.

    ``majority_from`` (default: the same items) fixes which rows define each file's majority answer.
    """
    close = [it for it in items if it.close]
    majority = majority_answers(majority_from if majority_from is not None else close)
    rows: list[tuple[BenchItem, str | None, str | None, str | None]] = []
    parsed: dict[str, str | None] = {}
    for it in close:
        if it.key not in answers:
            continue
        yn = is_yes_no(it.answer)
        p = parse_choice(answers[it.key], it.options, yes_no=yn)
        t = None
        if text_only_answers is not None and it.key in text_only_answers:
            t = parse_choice(text_only_answers[it.key], it.options, yes_no=yn) or ""
        parsed[f"{it.task}/{it.id}"] = p
        rows.append((it, p, majority.get(it.task), t))
    by_task: dict[str, list] = defaultdict(list)
    by_cap: dict[str, list] = defaultdict(list)
    for r in rows:
        by_task[r[0].task].append(r)
        by_cap[r[0].capability].append(r)
    return AccuracyReport(
        per_task={t: _cell(r) for t, r in by_task.items()},
        per_capability={c: _cell(r) for c, r in by_cap.items()},
        pooled=_cell(rows) if rows else None,
        parsed=parsed,
    )
