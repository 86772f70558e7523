"""WSI-Precision and WSI-Relevance: the published two-step claim protocol with a pluggable judge.

- WSI-Precision: claims are extracted from the ground truth, then each is scored against the model's
  answer (1 / 0.7 / 0.3 / 0); the question's score is the mean (a soft recall of reference facts).
- WSI-Relevance: claims are extracted from the model's answer, then each is scored against the
  ground truth (a soft precision of the model's claims).

Per question the mean is rounded to 3 decimals, as the official scripts do. A judge reply that
cannot be read is retried (with a format reminder); if it still cannot be read the question gets no
score and is counted as a parse failure, never scored 0 silently. Claims the ground truth does not
address count 0 by default (``unsupported="zero"``, the paper's figure); ``unsupported="ignore"``
drops them from the mean (the official relevance prompt's wording). An empty model answer gets
WSI-Relevance 0 without a judge call (it makes no claim, and dropping it would reward silence).
"""

from __future__ import annotations

import ast
import json
import logging
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from wsi_llava.errors import WsiLlavaError
from wsi_llava.eval.bench import BenchItem
from wsi_llava.eval.judges.base import Judge, JudgeError, Messages
from wsi_llava.eval.tasks import CAPABILITIES, REPORT
from wsi_llava.progress import CancelToken, ProgressCallback, no_progress

logger = logging.getLogger(__name__)

Metric = Literal["precision", "relevance"]
Unsupported = Literal["zero", "ignore"]
PROMPT_NAMES = tuple(
    f"{m}_{step}.{role}"
    for m in ("precision", "relevance")
    for step in ("extract", "score")
    for role in ("system", "user")
) + ("retry.user",)


class Prompts(BaseModel):
    """The judge prompt texts, by file stem (``precision_extract.system`` ...)."""

    texts: dict[str, str]
    source: str = Field("built-in", description="'built-in' or the --prompts folder")

    def get(self, name: str) -> str:
        return self.texts[name]


def load_prompts(folder: str | Path | None = None) -> Prompts:
    """Built-in prompts, with any ``<name>.txt`` found in ``folder`` replacing the built-in one.

    User templates may use ``{question}``, ``{ground_truth}``, ``{response}`` and ``{claims}``.
    """
    base = resources.files("wsi_llava.eval.prompts")
    texts = {n: base.joinpath(f"{n}.txt").read_text(encoding="utf-8") for n in PROMPT_NAMES}
    if folder is None:
        return Prompts(texts=texts)
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise WsiLlavaError(f"--prompts {folder}: no such folder")
    found = sorted(folder.glob("*.txt"))
    unknown = [p.name for p in found if p.stem not in PROMPT_NAMES]
    if unknown:
        raise WsiLlavaError(
            f"--prompts {folder}: unknown prompt file(s) {', '.join(unknown)}; "
            f"expected names: {', '.join(n + '.txt' for n in PROMPT_NAMES)}"
        )
    if not found:
        raise WsiLlavaError(
            f"--prompts {folder}: no <name>.txt prompt files (names: {', '.join(PROMPT_NAMES)})"
        )
    for p in found:
        texts[p.stem] = p.read_text(encoding="utf-8")
    return Prompts(texts=texts, source=str(folder))


def fill(template: str, **values: str) -> str:
    """Replace ``{name}`` placeholders only (JSON braces in a prompt stay untouched)."""
    for k, v in values.items():
        template = template.replace("{" + k + "}", v)
    return template


# --- parsing judge replies --------------------------------------------------------------------------

_FENCE = re.compile(r"```(?:json|python)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)


def _load_list(text: str) -> list | None:
    """The first JSON (or Python-literal) list in ``text``; ``None`` when there is none."""
    m = _FENCE.search(text)
    if m:
        text = m.group(1)
    start = text.find("[")
    if start < 0:
        return None
    end = text.rfind("]")
    candidates = [text[start : end + 1]] if end > start else []
    for cand in candidates:
        for loader in (json.loads, ast.literal_eval):
            try:
                value = loader(cand)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
            if isinstance(value, list):
                return value
    return None


def parse_claims(text: str) -> list[str] | None:
    """A list of claim strings (objects with a ``claim`` key are accepted too)."""
    value = _load_list(text)
    if value is None:
        return None
    claims = []
    for v in value:
        if isinstance(v, str):
            claims.append(v.strip())
        elif isinstance(v, dict) and isinstance(v.get("claim"), str):
            claims.append(v["claim"].strip())
        else:
            return None
    return [c for c in claims if c]


class ClaimScore(BaseModel):
    claim: str = ""
    score: float
    addressed: bool = True
    explanation: str = ""


def _as_bool(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() not in ("false", "no", "0", "n/a", "none")
    return bool(v)


def parse_scores(text: str) -> list[ClaimScore] | None:
    """A list of ``{claim, explanation, score[, addressed]}`` objects with numeric scores in [0, 1]."""
    value = _load_list(text)
    if not value:
        return None
    out = []
    for v in value:
        if not isinstance(v, dict) or "score" not in v:
            return None
        raw = v["score"]
        addressed = _as_bool(v.get("addressed", True))
        if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("n/a", "na", "none", "")):
            out.append(ClaimScore(claim=str(v.get("claim", "")), score=0.0, addressed=False))
            continue
        if isinstance(raw, bool):  # true/false is no score on the 1 / 0.7 / 0.3 / 0 scale
            return None
        try:
            score = float(raw)
        except (TypeError, ValueError):
            return None
        if not 0.0 <= score <= 1.0:
            return None
        out.append(
            ClaimScore(
                claim=str(v.get("claim", "")),
                score=score,
                addressed=addressed,
                explanation=str(v.get("explanation", "")),
            )
        )
    return out


# --- scoring ----------------------------------------------------------------------------------------


class QuestionScore(BaseModel):
    """One question's WSI-P or WSI-R with what the judge said; ``score`` None = not scored (see failure)."""

    task: str
    id: str
    metric: Metric
    score: float | None
    claims: list[str] = Field(default_factory=list)
    claim_scores: list[float] = Field(default_factory=list)
    ignored: int = Field(0, description="claims dropped as not addressed (unsupported='ignore')")
    failure: Literal["unparsable", "no_claims", "no_addressed_claims"] | None = None
    attempts: int = 0


class WsiScorer:
    """Runs the two judge steps for one question; thread-safe when the judge is."""

    def __init__(
        self,
        judge: Judge,
        prompts: Prompts | None = None,
        unsupported: Unsupported = "zero",
        parse_retries: int = 2,
    ):
        if unsupported not in ("zero", "ignore"):
            raise WsiLlavaError(f"--unsupported {unsupported!r}: expected 'zero' or 'ignore'")
        self.judge = judge
        self.prompts = prompts or load_prompts()
        self.unsupported = unsupported
        self.parse_retries = int(parse_retries)

    def _ask(self, system: str, user: str, parser: Callable[[str], Any]) -> tuple[Any, int]:
        messages: Messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        for attempt in range(self.parse_retries + 1):
            reply = self.judge.complete(messages)
            parsed = parser(reply)
            if parsed is not None:
                return parsed, attempt + 1
            logger.debug("judge reply not readable (attempt %d): %.200s", attempt + 1, reply)
            messages = messages + [
                {"role": "assistant", "content": reply},
                {"role": "user", "content": self.prompts.get("retry.user")},
            ]
        return None, self.parse_retries + 1

    def score(self, item: BenchItem, answer: str, metric: Metric) -> QuestionScore:
        """WSI-P (``precision``) or WSI-R (``relevance``) of ``answer`` to ``item``."""
        p = self.prompts
        base = {"task": item.task, "id": item.id, "metric": metric}
        if metric == "relevance" and not answer.strip():
            return QuestionScore(**base, score=0.0)
        source = item.answer if metric == "precision" else answer
        claims, n1 = self._ask(
            p.get(f"{metric}_extract.system"),
            fill(
                p.get(f"{metric}_extract.user"), question=item.question, ground_truth=source, response=source
            ),
            parse_claims,
        )
        if claims is None:
            return QuestionScore(**base, score=None, failure="unparsable", attempts=n1)
        if not claims:
            return QuestionScore(**base, score=None, failure="no_claims", attempts=n1)
        claims_text = json.dumps(claims, ensure_ascii=False, indent=0)
        scored, n2 = self._ask(
            p.get(f"{metric}_score.system"),
            fill(
                p.get(f"{metric}_score.user"),
                question=item.question,
                claims=claims_text,
                response=answer,
                ground_truth=item.answer,
            ),
            parse_scores,
        )
        if scored is None:
            return QuestionScore(**base, score=None, claims=claims, failure="unparsable", attempts=n1 + n2)
        values, ignored = [], 0
        for s in scored:
            if not s.addressed and metric == "relevance":
                if self.unsupported == "ignore":
                    ignored += 1
                    continue
                values.append(0.0)
            else:
                values.append(s.score)
        if not values:
            return QuestionScore(
                **base,
                score=None,
                claims=claims,
                ignored=ignored,
                failure="no_addressed_claims",
                attempts=n1 + n2,
            )
        return QuestionScore(
            **base,
            score=round(sum(values) / len(values), 3),
            claims=claims,
            claim_scores=values,
            ignored=ignored,
            attempts=n1 + n2,
        )


class PartialScores(JudgeError):
    """The judge failed part-way; ``scores`` holds the questions finished before it did."""

    def __init__(self, message: str, scores: list[QuestionScore]) -> None:
        super().__init__(message)
        self.scores = scores


def score_open(
    items: Iterable[BenchItem],
    answers: Mapping[tuple[str, str], str],
    scorer: WsiScorer,
    metrics: Iterable[Metric] = ("precision", "relevance"),
    progress: ProgressCallback = no_progress,
    cancel: CancelToken | None = None,
) -> list[QuestionScore]:
    """Judge every open item that has an answer, ``judge.concurrency`` questions at a time."""
    jobs = [(it, m) for it in items if not it.close and it.key in answers for m in metrics]
    results: list[QuestionScore] = []
    total = len(jobs)
    workers = max(1, int(getattr(scorer.judge, "concurrency", 1)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = {pool.submit(scorer.score, it, answers[it.key], m) for it, m in jobs}
        error: BaseException | None = None
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for f in done:
                if f.exception() is not None:
                    error = error or f.exception()
                else:
                    results.append(f.result())
            progress(len(results), total, "judging")
            if error is not None or (cancel is not None and cancel.cancelled):
                for f in pending:
                    f.cancel()
                for f in pending:
                    if not f.cancelled() and f.exception() is None:
                        results.append(f.result())
                break
    if error is not None:
        raise PartialScores(
            f"{error} ({len(results)} of {total} judgements finished and kept)", results
        ) from error
    if cancel is not None:
        cancel.raise_if_cancelled()
    return results


# --- aggregation ------------------------------------------------------------------------------------


class MeanCell(BaseModel):
    """Mean score over the scored questions of a group, with how many could not be scored."""

    mean: float | None
    n: int
    failures: int = 0


def _cell(values: list[QuestionScore]) -> MeanCell:
    scored = [v.score for v in values if v.score is not None]
    return MeanCell(
        mean=sum(scored) / len(scored) if scored else None, n=len(scored), failures=len(values) - len(scored)
    )


class MetricAggregate(BaseModel):
    """One metric (WSI-P or WSI-R) at every level of the paper's tables."""

    per_metadata: dict[str, MeanCell]
    per_task: dict[str, MeanCell]
    per_capability: dict[str, MeanCell] = Field(description="macro average over the capability's open tasks")
    report: MeanCell | None = Field(None, description="report generation, kept apart as in Table 3")
    overall: MeanCell = Field(description="micro average over every scored question")
    failures: dict[str, int] = Field(default_factory=dict, description="failure kind -> count")


def aggregate(scores: Iterable[QuestionScore], items: Iterable[BenchItem], metric: Metric) -> MetricAggregate:
    """Per ``metadata`` type, per task, per capability (macro over tasks), report apart, overall."""
    by_key = {it.key: it for it in items}
    rows = [s for s in scores if s.metric == metric and (s.task, s.id) in by_key]
    by_meta: dict[str, list[QuestionScore]] = defaultdict(list)
    by_task: dict[str, list[QuestionScore]] = defaultdict(list)
    failures: dict[str, int] = defaultdict(int)
    for s in rows:
        it = by_key[(s.task, s.id)]
        by_meta[it.metadata].append(s)
        by_task[it.task].append(s)
        if s.failure:
            failures[s.failure] += 1
    per_task = {t: _cell(v) for t, v in by_task.items()}
    caps: dict[str, list[str]] = defaultdict(list)
    for t in per_task:
        cap = next(it.capability for it in by_key.values() if it.task == t)
        caps[cap].append(t)
    per_cap: dict[str, MeanCell] = {}
    for cap, tasks in caps.items():
        if cap == REPORT:
            continue
        means = [per_task[t].mean for t in tasks if per_task[t].mean is not None]
        per_cap[cap] = MeanCell(
            mean=sum(means) / len(means) if means else None,
            n=sum(per_task[t].n for t in tasks),
            failures=sum(per_task[t].failures for t in tasks),
        )
    report_rows = [s for s in rows if by_key[(s.task, s.id)].capability == REPORT]
    ordered = {c: per_cap[c] for c in CAPABILITIES if c in per_cap} | {
        c: v for c, v in per_cap.items() if c not in CAPABILITIES
    }
    return MetricAggregate(
        per_metadata={m: _cell(v) for m, v in by_meta.items()},
        per_task=per_task,
        per_capability=ordered,
        report=_cell(report_rows) if report_rows else None,
        overall=_cell(rows),
        failures=dict(failures),
    )
