"""Run a model over bench questions to produce predictions: resumable, greedy by default.

Two sources of visual tokens:
- ``slides``: our pipeline end to end, one ``SlideSession`` per slide (region rows ask about their
  rectangle);
- ``features``: the official ``.pt`` tensors (576 x 1024), looked up by the bench ``image`` path.
``zero_visual=True`` replaces the visual tokens by zeros of the same shape: the text-only baseline.

Predictions are appended to a JSONL file line by line; a re-run skips the ``(task, id)`` keys already
there, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from wsi_llava.errors import RegionError, WsiLlavaError
from wsi_llava.eval.bench import Bench, BenchItem, ItemRegions
from wsi_llava.progress import CancelToken, ProgressCallback, no_progress

logger = logging.getLogger(__name__)

Answerer = Callable[[BenchItem], str]


class Decoding(BaseModel):
    """Decoding settings, recorded in ``scores.json``; temperature 0 = greedy."""

    temperature: float = Field(0.0, ge=0)
    max_new_tokens: int = Field(512, gt=0)
    seed: int | None = None


def read_predictions(path: Path) -> dict[tuple[str, str], str]:
    """``(task, id) -> answer`` from one of our predictions.jsonl files (missing file: empty)."""
    done: dict[tuple[str, str], str] = {}
    if not path.is_file():
        return done
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            done[(str(row["task"]), str(row["id"]))] = str(row["answer"])
        except (json.JSONDecodeError, KeyError, TypeError):
            # a line cut by an interruption: it is asked again
            logger.warning("%s line %d: unreadable prediction, it will be recomputed", path, i)
    return done


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
) -> dict[tuple[str, str], str]:
    """Answer every item not yet in ``out_file`` (appending as it goes); return all answers."""
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    done = read_predictions(out_file)
    items = list(items)
    todo = [it for it in items if it.key not in done]
    if done:
        logger.info("%s: %d answers already there, %d to go", out_file, len(items) - len(todo), len(todo))
    total, finished = len(items), len(items) - len(todo)
    progress(finished, total, "answering")
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
            fh.write(json.dumps(prediction_row(it, answer, model_name, **extra), ensure_ascii=False) + "\n")
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
