"""Run a model over bench questions to produce predictions: resumable, greedy by default.

Two sources of visual tokens:
- ``slides``: our pipeline end to end, one ``SlideSession`` per slide (region rows ask about their
  rectangle);
- ``features``: the official ``.pt`` tensors (576 x 1024), looked up by the bench ``image`` path.
``zero_visual=True`` replaces the visual tokens by zeros of the same shape: the text-only baseline.

Predictions are appended to a JSONL file line by line; a re-run skips the ``(task, id)`` keys already
there, so an interrupted run continues where it stopped. Every row records its run (``RunInfo``: model,
baseline, visual source, decoding); a file holding another run's rows, or answers to other questions, is
never resumed into (one predictions file, one run). A last line cut by an interruption is dropped before
appending; several rows for one question are reported and the last one is used.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from wsi_llava.errors import RegionError, WsiLlavaError
from wsi_llava.eval.bench import Bench, BenchItem, ItemRegions
from wsi_llava.progress import CancelToken, ProgressCallback, no_progress

logger = logging.getLogger(__name__)

Answerer = Callable[[BenchItem], str]


class Decoding(BaseModel):
    """Decoding settings, recorded in ``scores.json``; temperature 0 = greedy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(0.0, ge=0)
    max_new_tokens: int = Field(512, gt=0)
    seed: int | None = None


class RunInfo(BaseModel):
    """What produced a file's answers; rows of different runs never share one predictions file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Literal["model", "majority", "predictions"]
    model: str | None = Field(None, description="--model as given (a folder as its absolute path)")
    model_base: str | None = None
    dtype: str | None = None
    baseline: str | None = Field(None, description="'text-only' or 'majority' (None: the model itself)")
    visual: Literal["slides", "features", "zero"] | None = Field(None, description="visual tokens from")
    decoding: Decoding | None = None
    predictions: str | None = Field(None, description="--predictions file (absolute) the rows came from")

    def describe(self) -> str:
        """One line for messages, e.g. ``model demo, visual tokens from zero, text-only baseline, temperature 0 ...``."""
        if self.source == "majority":
            return "majority baseline"
        if self.source == "predictions":
            return f"answers copied from --predictions {self.predictions}"
        parts = [f"model {self.model}"]
        if self.model_base:
            parts.append(f"base {self.model_base}")
        if self.dtype:
            parts.append(f"dtype {self.dtype}")
        if self.visual:
            parts.append(f"visual tokens from {self.visual}")
        if self.baseline:
            parts.append(f"{self.baseline} baseline")
        if self.decoding is not None:
            d = self.decoding
            parts.append(f"temperature {d.temperature:g}, max_new_tokens {d.max_new_tokens}, seed {d.seed}")
        return ", ".join(parts)


class PredictionFile(BaseModel):
    """What one of our predictions.jsonl files holds, read without changing it."""

    answers: dict[tuple[str, str], str] = Field(default_factory=dict)
    questions: dict[tuple[str, str], str] = Field(default_factory=dict, description="key -> question asked")
    runs: list[RunInfo | None] = Field(
        default_factory=list, description="distinct runs of its rows (None: a row without 'run')"
    )
    duplicates: int = Field(0, description="rows for a question that already had one (the last is used)")
    unreadable: list[int] = Field(
        default_factory=list, description="line numbers of rows that cannot be read"
    )
    truncated_tail: bool = Field(False, description="the last line is cut (no newline, not a row)")


def _parse_row(line: str) -> tuple[tuple[str, str], str, str | None, RunInfo | None]:
    row = json.loads(line)
    key = (str(row["task"]), str(row["id"]))
    run = RunInfo.model_validate(row["run"]) if row.get("run") is not None else None
    question = row.get("question")
    return key, str(row["answer"]), str(question) if question is not None else None, run


def scan_predictions(path: str | Path) -> PredictionFile:
    """Read our predictions.jsonl (a missing file is empty): answers, runs, duplicates, damaged lines."""
    path = Path(path)
    found = PredictionFile()
    if not path.is_file():
        return found
    data = path.read_bytes()
    lines = data.decode("utf-8", errors="replace").split("\n")
    tail = lines.pop()  # "" after a final newline, else a last line without its newline
    for i, line in enumerate(lines, start=1):
        if line.strip():
            _add_row(found, line, i)
    if tail.strip() and not _add_row(found, tail, len(lines) + 1, tail=True):
        found.truncated_tail = True
    return found


def _add_row(found: PredictionFile, line: str, number: int, tail: bool = False) -> bool:
    try:
        key, answer, question, run = _parse_row(line)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValidationError):
        if not tail:
            found.unreadable.append(number)
        return False
    if key in found.answers:
        found.duplicates += 1
    found.answers[key] = answer
    if question is not None:
        found.questions[key] = question
    if run not in found.runs:
        found.runs.append(run)
    return True


def read_predictions(path: Path) -> dict[tuple[str, str], str]:
    """``(task, id) -> answer`` from one of our predictions.jsonl files (missing file: empty)."""
    return scan_predictions(path).answers


def _other_run(path: Path, found: PredictionFile, run: RunInfo) -> str | None:
    """Why ``path`` belongs to another run than ``run`` (None: it is empty or the same run)."""
    if found.unreadable and not found.answers:
        return f"{path}: holds rows that are not wsi-llava predictions (line {found.unreadable[0]} has no task/id/answer)"
    others = [r for r in found.runs if r != run]
    if not others:
        return None
    other = others[0]
    what = (
        "rows written without run settings (an older wsi-llava or another tool)"
        if other is None
        else f"answers of another run ({other.describe()})"
    )
    return f"{path}: holds {what}; this run is {run.describe()}"


def check_run(path: str | Path, run: RunInfo) -> PredictionFile:
    """Refuse a predictions file that holds another run's rows; return what it holds."""
    path = Path(path)
    found = scan_predictions(path)
    why = _other_run(path, found, run)
    if why is not None:
        raise WsiLlavaError(
            f"{why}. Reusing or replacing them would mislabel results: give another --out, or delete "
            f"{path} to start over"
        )
    return found


def write_predictions(path: str | Path, rows: Iterable[dict[str, Any]], run: RunInfo) -> None:
    """Write a whole predictions file at once (atomically), after :func:`check_run` allowed it."""
    from wsi_llava.atomic import atomic_write_text

    check_run(path, run)
    run_json = run.model_dump(mode="json")
    atomic_write_text(
        path, "".join(json.dumps({**r, "run": run_json}, ensure_ascii=False) + "\n" for r in rows)
    )


def _end_cleanly(path: Path, found: PredictionFile) -> None:
    """Make ``path`` end with a newline before appending: a cut last line is dropped (and reported)."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    if not found.truncated_tail:  # a complete last row without its newline
        with path.open("ab") as fh:
            fh.write(b"\n")
        return
    keep = data.rfind(b"\n") + 1
    with path.open("r+b") as fh:
        fh.truncate(keep)
    logger.warning(
        "%s: dropped a truncated last line (%d bytes, cut by an interruption); its question is asked again",
        path,
        len(data) - keep,
    )


def prediction_row(item: BenchItem, answer: str, model: str, **extra: Any) -> dict[str, Any]:
    """One predictions.jsonl row: our keys plus the official ``model_vqa.py`` ones."""
    return {
        "task": item.task,
        "id": item.id,
        "question_id": item.question_id,
        "image": item.image,
        "question": item.question,
        "answer": answer,
        "T-answer": item.answer,
        "metadata": item.metadata,
        "model": model,
        **extra,
    }


def run_predictions(
    items: Iterable[BenchItem],
    out_file: str | Path,
    answer_fn: Answerer,
    model_name: str,
    progress: ProgressCallback = no_progress,
    cancel: CancelToken | None = None,
    run: RunInfo | None = None,
) -> dict[tuple[str, str], str]:
    """Answer every item not yet in ``out_file`` (appending as it goes); return all answers.

    ``run`` (default: a model run named ``model_name``) must match the runs already in the file.
    """
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    run = run or RunInfo(source="model", model=model_name)
    found = check_run(out_file, run)
    items = list(items)
    moved = [
        it.key
        for it in items
        if it.key in found.questions and found.questions[it.key].strip() != it.question.strip()
    ]
    if moved:
        raise WsiLlavaError(
            f"{out_file}: its answer to {moved[0][0]}/{moved[0][1]} (and {len(moved) - 1} more) is to another "
            "question than the bench's (another bench version?): give another --out, or delete the file"
        )
    if found.duplicates:
        logger.warning(
            "%s: %d rows repeat a question that an earlier row answers; the last row of each question is used",
            out_file,
            found.duplicates,
        )
    _end_cleanly(out_file, found)
    for i in found.unreadable:
        logger.warning("%s line %d: unreadable prediction, it will be recomputed", out_file, i)
    done = dict(found.answers)
    todo = [it for it in items if it.key not in done]
    if done:
        logger.info("%s: %d answers already there, %d to go", out_file, len(items) - len(todo), len(todo))
    total, finished = len(items), len(items) - len(todo)
    progress(finished, total, "answering")
    run_json = run.model_dump(mode="json")
    with out_file.open("a", encoding="utf-8") as fh:
        for it in todo:
            if cancel is not None:
                cancel.raise_if_cancelled()
            extra: dict[str, Any] = {}
            try:
                answer = answer_fn(it).strip()
            except RegionError as e:  # this row's region cannot be asked about: recorded, the rest go on
                logger.warning("%s %s: not answered: %s", it.task, it.id, e)
                answer, extra = "", {"error": str(e)}
            row = prediction_row(it, answer, model_name, **extra, run=run_json)
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()
            done[it.key] = answer
            finished += 1
            progress(finished, total, "answering")
    return {it.key: done[it.key] for it in items if it.key in done}


def _generate(model: Any, question: str, visual: Any, decoding: Decoding) -> str:
    for _ in model.stream(
        question,
        visual,
        max_new_tokens=decoding.max_new_tokens,
        temperature=decoding.temperature,
        seed=decoding.seed,
    ):
        pass
    return model.last_generation.text


def feature_path(features_dir: Path, image: str) -> Path:
    """``features_dir/image``, else ``features_dir/<file name>``, for an official ``.pt`` path."""
    for cand in (features_dir / image, features_dir / Path(image).name):
        if cand.is_file():
            return cand
    raise WsiLlavaError(
        f"--features {features_dir}: no feature file for image {image!r} (looked for {features_dir / image})"
    )


def feature_answerer(
    model: Any, features_dir: str | Path, decoding: Decoding, zero_visual: bool = False
) -> Answerer:
    """Answers from precomputed ``(n_tokens, in_dim)`` tensors (``.pt``), or zeros of that shape."""
    import torch

    features_dir = Path(features_dir)
    in_dim = model.spec.projector.in_dim
    n_tokens = model.spec.n_visual_tokens

    def answer(item: BenchItem) -> str:
        if zero_visual:
            visual = torch.zeros(n_tokens, in_dim)
        else:
            from wsi_llava.model.tokens_file import load_visual_tokens

            visual = load_visual_tokens(feature_path(features_dir, item.image), in_dim)
        return _generate(model, item.question, visual, decoding)

    return answer


def slide_path(item: BenchItem, slides_dir: Path | None, root: Path | None) -> Path:
    """Where the slide of ``item`` is: under ``slides_dir`` (full relative path or file name) or ``root``."""
    cands = []
    if slides_dir is not None:
        cands += [slides_dir / item.image, slides_dir / Path(item.image).name]
    if root is not None:
        cands.append(root / item.image)
    for c in cands:
        if c.exists():
            return c
    where = ", ".join(str(c) for c in cands) or "(give --slides)"
    raise WsiLlavaError(f"{item.source}: slide {item.image!r} not found (looked in {where})")


def slide_answerer(
    model: Any,
    bench: Bench,
    slides_dir: str | Path | None,
    decoding: Decoding,
    cache_dir: str | Path | None = None,
    device: str = "cpu",
) -> Answerer:
    """Answers through ``SlideSession`` (features once per slide; region rows ask about their region)."""
    from wsi_llava.session import SlideSession

    slides = Path(slides_dir) if slides_dir is not None else None
    regions = ItemRegions(bench.root)
    state: dict[str, Any] = {"path": None, "session": None}

    def answer(item: BenchItem) -> str:
        path = slide_path(item, slides, bench.root)
        if state["path"] != path:
            if state["session"] is not None:
                state["session"].close()
            state["session"] = SlideSession(path, model, cache_dir=cache_dir, device=device)
            state["path"] = path
        region = regions.region(item)
        ans = state["session"].ask(
            item.question,
            region,
            max_new_tokens=decoding.max_new_tokens,
            temperature=decoding.temperature,
            evidence=False,
        )
        return ans.answer

    return answer


def majority_predictions(items: Iterable[BenchItem]) -> dict[tuple[str, str], str]:
    """The majority baseline as predictions: each task's most frequent ground-truth answer."""
    from wsi_llava.eval.accuracy import majority_answers

    items = list(items)
    maj = majority_answers(items)
    return {it.key: maj[it.task] for it in items}
