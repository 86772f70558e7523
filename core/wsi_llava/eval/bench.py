"""Load WSI-Bench questions (per-task conversation JSON, the 2026 JSONL, our synthetic world) and predictions.

Every row becomes one ``BenchItem`` keyed by ``(task, id)``: ``id`` repeats across tasks in the
published files, so it is never a key on its own.

Predictions (``load_predictions``) are matched to items as follows:
- our JSONL rows carry ``task`` and ``id`` (and a ``question_id`` too);
- the official ``model_vqa.py`` JSONL and the ``WSI-Metric`` CSV carry ``question_id``. For the open
  questions it is the 2026 id ``<Prefix>_<id>_1`` (``Prefix`` = ``Caption``, ``Tissue``, ``Grade`` ...);
  for close-ended and unknown tasks we use ``<task>_<id>_1``. ``BenchItem.question_id`` gives it.
A predictions file where no row matches a question is an error; rows that match nothing while others
do are counted, logged as a warning and reported in ``scores.json`` (``predictions.unmatched``).
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from wsi_llava.errors import WsiLlavaError
from wsi_llava.eval.tasks import (
    KNOWN_TASKS,
    METADATA_TASK,
    REGIONAL_TYPES,
    canonical_task,
    looks_close_ended,
    regional_type,
    task_info,
)

logger = logging.getLogger(__name__)

SPLIT_WORDS = ("test", "train", "val", "valid", "validation", "dev")
_OPTION = re.compile(r"(?:^|\s)\(?([A-D])\)\s*(.+?)(?=\s+\(?[A-D]\)\s|\s*$)", re.DOTALL)


class RegionBox(BaseModel):
    """A rectangle in level-0 pixels, as synthetic region questions carry it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    x: float
    y: float
    w: float
    h: float


class BenchItem(BaseModel):
    """One benchmark question with its ground truth; ``key`` = ``(task, id)``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: str = Field(description="task file stem, e.g. 'Grading', 'Morphology_choice'")
    id: str
    capability: str
    kind: Literal["open", "close"]
    question: str = Field(description="the question without the leading '<image>\\n'")
    answer: str = Field(description="ground truth: free text, or one letter A-D / Yes / No")
    options: dict[str, str] = Field(
        default_factory=dict, description="close-ended options parsed from the question"
    )
    image: str = Field(description="slide or feature path as written in the bench file")
    metadata: str = Field(description="2026-format type: Caption, tissue, Grade, ... (task name when absent)")
    region: RegionBox | None = None
    annotation_id: str | None = None
    source: str = Field("", description="file and row the item came from")

    @property
    def key(self) -> tuple[str, str]:
        return (self.task, self.id)

    @property
    def close(self) -> bool:
        return self.kind == "close"

    @property
    def question_id(self) -> str:
        """The official-style id: ``<Prefix>_<id>_1`` (see the module docstring)."""
        info = KNOWN_TASKS.get(self.task)
        if self.task == "Regional_Structure_Description" and self.metadata in REGIONAL_TYPES:
            prefix = REGIONAL_TYPES[self.metadata]
        elif info is not None and info.prefix:
            prefix = info.prefix
        else:
            prefix = self.task
        return f"{prefix}_{self.id}_1"

    @property
    def slide(self) -> str:
        """The slide identity (file stem of ``image``), used for the slide-disjoint subset."""
        return slide_id(self.image)


class Bench(BaseModel):
    """The loaded questions, in file order, and the folder that image paths are relative to."""

    model_config = ConfigDict(extra="forbid")

    items: list[BenchItem]
    root: Path | None = Field(None, description="folder that 'image' paths resolve against (synthetic world)")
    files: list[str] = Field(default_factory=list)

    def by_key(self) -> dict[tuple[str, str], BenchItem]:
        return {it.key: it for it in self.items}

    def tasks(self) -> list[str]:
        seen: dict[str, None] = {}
        for it in self.items:
            seen.setdefault(it.task, None)
        return list(seen)


class ItemRegions:
    """The region each bench row asks about, whole annotations read once per slide.

    A row with a ``region`` box asks about that rectangle; one with ``annotation_id`` and no box (our
    synthetic world's ``region: null``) about the whole annotation, the polygon with that id in
    ``annotations/<slide stem>.geojson`` beside the bench; any other row about the whole slide.
    """

    def __init__(self, root: Path | None) -> None:
        self.root = root
        self._by_file: dict[Path, dict[str, Any]] = {}

    def region(self, item: BenchItem) -> Any:
        """A ``Region`` (level-0 px), or None for the whole slide; a missing annotation is a ``RegionError``."""
        from wsi_llava.errors import RegionError
        from wsi_llava.slide.region import Region

        if item.region is not None:
            r = item.region
            return Region.rectangle(r.x, r.y, r.w, r.h, id=item.annotation_id)
        if item.annotation_id is None:
            return None
        if self.root is None:
            raise RegionError(
                f"{item.source}: asks about annotation {item.annotation_id} as a whole, but the bench has "
                "no folder with annotations/ (load the world folder)"
            )
        path = self.root / "annotations" / f"{Path(item.image).stem}.geojson"
        if path not in self._by_file:
            from wsi_llava.slide.geojson import read_geojson

            if not path.is_file():
                raise RegionError(f"{item.source}: {path} not found (annotation {item.annotation_id})")
            self._by_file[path] = {r.id: r for r in read_geojson(path, skip_unsupported=True) if r.id}
        found = self._by_file[path].get(item.annotation_id)
        if found is None:
            raise RegionError(f"{item.source}: no annotation {item.annotation_id} in {path}")
        return found


def slide_id(image: str) -> str:
    """``TCGA-LUSC/TCGA-21-1083-...pt`` -> ``TCGA-21-1083-...`` (file stem, any folder)."""
    name = image.replace("\\", "/").rsplit("/", 1)[-1]
    for suffix in (".pt", ".tiff", ".tif", ".svs", ".ndpi", ".mrxs", ".zarr", ".h5"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def parse_options(question: str) -> dict[str, str]:
    """``"... A) x B) y C) z D) w"`` -> ``{"A": "x", ...}``; empty when the question has no options."""
    found = {m.group(1): m.group(2).strip() for m in _OPTION.finditer(question)}
    return found if len(found) >= 2 else {}


def task_from_filename(path: Path, split: str | None = None) -> str:
    """``Grading_test.json`` -> ``Grading``; ``1_Report_test.json`` -> ``1_Report``."""
    stem = path.stem
    head, _, tail = stem.rpartition("_")
    if head and (tail.lower() in SPLIT_WORDS or (split and tail == split)):
        return head
    return stem


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WsiLlavaError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WsiLlavaError(f"{path}: not valid JSON ({e})") from None


def _conversation_item(row: Any, task: str, where: str) -> BenchItem:
    if not isinstance(row, dict):
        raise WsiLlavaError(
            f"{where}: expected an object with 'id', 'image', 'conversations', got {type(row).__name__}"
        )
    missing = [k for k in ("id", "image", "conversations") if k not in row]
    if missing:
        raise WsiLlavaError(
            f"{where}: missing field(s) {', '.join(missing)} (expected 'id', 'image', 'conversations')"
        )
    conv = row["conversations"]
    if (
        not isinstance(conv, list)
        or len(conv) < 2
        or not all(isinstance(m, dict) and isinstance(m.get("value"), str) for m in conv[:2])
    ):
        raise WsiLlavaError(
            f"{where}: 'conversations' must be a list of a human and a gpt message with 'value' text"
        )
    if conv[0].get("from") != "human" or conv[1].get("from") != "gpt":
        raise WsiLlavaError(f"{where}: 'conversations' must start with a 'human' then a 'gpt' message")
    if len(conv) > 2:
        logger.warning("%s: %d messages, only the first question/answer pair is evaluated", where, len(conv))
    question = conv[0]["value"].replace("<image>\n", "").replace("<image>", "").strip()
    answer = conv[1]["value"].strip()
    meta = row.get("metadata")
    info = task_info(task, meta if isinstance(meta, str) else None, looks_close_ended(answer))
    if not isinstance(meta, str) or not meta:
        if info.metadata:
            meta = info.metadata
        elif info.task == "Regional_Structure_Description":
            meta = regional_type(question)
        else:
            meta = info.task
    close = info.close if info.task in KNOWN_TASKS else looks_close_ended(answer)
    region = None
    if row.get("region") is not None:
        try:
            region = RegionBox.model_validate(row["region"])
        except Exception as e:
            raise WsiLlavaError(f"{where}: 'region' must be {{x, y, w, h}} in level-0 pixels ({e})") from None
    return BenchItem(
        task=info.task,
        id=str(row["id"]),
        capability=info.capability,
        kind="close" if close else "open",
        question=question,
        answer=answer.rstrip(".") if close else answer,
        options=parse_options(question) if close else {},
        image=str(row["image"]),
        metadata=meta,
        region=region,
        annotation_id=str(row["annotation_id"]) if row.get("annotation_id") is not None else None,
        source=where,
    )


def load_conversation_file(path: Path, task: str | None = None, split: str | None = None) -> list[BenchItem]:
    """A LLaVA conversation JSON list (``*_test.json``, ``*_train.json``, synthetic ``bench/*.json``)."""
    data = _read_json(path)
    if not isinstance(data, list):
        raise WsiLlavaError(
            f"{path}: expected a JSON list of conversation rows ('id', 'image', 'conversations'), "
            f"got {type(data).__name__}"
        )
    task = canonical_task(task or task_from_filename(path, split))
    return [_conversation_item(row, task, f"{path} row {i}") for i, row in enumerate(data)]


def load_jsonl_bench(path: Path) -> list[BenchItem]:
    """The 2026 open-question JSONL (``question_id``, ``image``, ``question``, ``T-answer``, ``metadata``)."""
    items = []
    for i, row in _iter_jsonl(path):
        where = f"{path} line {i}"
        missing = [k for k in ("question_id", "image", "question", "T-answer", "metadata") if k not in row]
        if missing:
            raise WsiLlavaError(
                f"{where}: missing field(s) {', '.join(missing)} "
                "(expected 'question_id', 'image', 'question', 'T-answer', 'metadata')"
            )
        meta = str(row["metadata"])
        qid = str(row["question_id"])
        prefix, sep, rest = qid.partition("_")
        if not sep:
            raise WsiLlavaError(f"{where}: question_id {qid!r} is not '<Prefix>_<id>_1'")
        ident = rest[:-2] if rest.endswith("_1") else rest
        task = METADATA_TASK.get(meta) or canonical_task(prefix)
        answer = str(row["T-answer"]).strip()
        info = task_info(task, meta, looks_close_ended(answer))
        close = info.close if info.task in KNOWN_TASKS else looks_close_ended(answer)
        question = str(row["question"]).replace("<image>\n", "").strip()
        items.append(
            BenchItem(
                task=info.task,
                id=ident,
                capability=info.capability,
                kind="close" if close else "open",
                question=question,
                answer=answer,
                options=parse_options(question) if close else {},
                image=str(row["image"]),
                metadata=meta,
                source=where,
            )
        )
    return items


def _iter_jsonl(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise WsiLlavaError(f"{path}: file not found") from None
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise WsiLlavaError(f"{path} line {i}: not valid JSON ({e})") from None
        if not isinstance(row, dict):
            raise WsiLlavaError(f"{path} line {i}: expected a JSON object, got {type(row).__name__}")
        yield i, row


def load_bench(path: str | Path, split: str | None = None) -> Bench:
    """Questions from a folder of per-task files, one JSON/JSONL file, or a synthetic world folder.

    ``split`` (e.g. ``test``) keeps only ``*_<split>.json`` files of a folder. Duplicate ``(task, id)``
    keys are an error (they usually mean train and test files were mixed).
    """
    path = Path(path).expanduser()
    root: Path | None = None
    if not path.exists():
        raise WsiLlavaError(f"--bench {path}: no such file or folder")
    if (
        path.is_dir()
        and (path / "bench").is_dir()
        and ((path / "manifest.json").exists() or not any(path.glob("*.json*")))
    ):
        root, path = path, path / "bench"  # a synthetic world: image paths are relative to it
    elif path.is_dir() and path.name == "bench" and (path.parent / "manifest.json").exists():
        root = path.parent
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl") and p.is_file())
        if split:
            files = [p for p in files if p.suffix == ".jsonl" or p.stem.endswith("_" + split)]
        if not files:
            raise WsiLlavaError(
                f"--bench {path}: no *.json or *.jsonl bench files"
                + (f" for split {split!r}" if split else "")
            )
    else:
        files = [path]
    items: list[BenchItem] = []
    for f in files:
        items.extend(load_jsonl_bench(f) if f.suffix == ".jsonl" else load_conversation_file(f, split=split))
    seen: dict[tuple[str, str], str] = {}
    for it in items:
        if it.key in seen:
            raise WsiLlavaError(
                f"{it.source}: duplicate (task, id) = {it.key} (first at {seen[it.key]}); "
                "do not mix splits or versions in one bench folder"
            )
        seen[it.key] = it.source
    if not items:
        raise WsiLlavaError(f"--bench {path}: the bench files hold no questions")
    logger.info("loaded %d questions (%d tasks) from %s", len(items), len({i.task for i in items}), path)
    return Bench(items=items, root=root, files=[str(f) for f in files])


def load_train_slides(paths: Iterable[str | Path]) -> set[str]:
    """Slide ids of every row in training files (folders of ``*.json``/``*.jsonl`` or files)."""
    slides: set[str] = set()
    for p in paths:
        p = Path(p).expanduser()
        if not p.exists():
            raise WsiLlavaError(f"--train {p}: no such file or folder")
        files = sorted(x for x in p.iterdir() if x.suffix in (".json", ".jsonl")) if p.is_dir() else [p]
        for f in files:
            rows: Iterable[Any] = (r for _, r in _iter_jsonl(f)) if f.suffix == ".jsonl" else _read_json(f)
            if not isinstance(rows, list) and f.suffix != ".jsonl":
                raise WsiLlavaError(f"{f}: expected a JSON list of rows with 'image'")
            for i, row in enumerate(rows):
                if not isinstance(row, dict) or "image" not in row:
                    raise WsiLlavaError(f"{f} row {i}: expected an object with an 'image' field")
                slides.add(slide_id(str(row["image"])))
    return slides


# --- predictions -----------------------------------------------------------------------------------

ANSWER_KEYS = ("answer", "text", "Output", "model_output")


class PredictionSet(BaseModel):
    """Predicted answers keyed by ``(task, id)``, with the rows that matched no question."""

    model_config = ConfigDict(extra="forbid")

    answers: dict[tuple[str, str], str]
    unmatched: list[str] = Field(default_factory=list, description="question ids / keys that matched nothing")
    duplicates: int = Field(0, description="rows for a question that already had one (the last row is used)")
    source: str = ""


def question_index(items: Iterable[BenchItem]) -> dict[str, tuple[str, str]]:
    """``question_id`` -> ``(task, id)`` for every item (official-style id and ``<task>_<id>_1``)."""
    index: dict[str, tuple[str, str]] = {}
    for it in items:
        index[it.question_id] = it.key
        index.setdefault(f"{it.task}_{it.id}_1", it.key)
    return index


def _row_answer(row: dict[str, Any], where: str) -> str:
    for k in ANSWER_KEYS:
        if k in row and row[k] is not None:
            return str(row[k])
    raise WsiLlavaError(f"{where}: no answer field (expected one of {', '.join(ANSWER_KEYS)})")


def load_predictions(path: str | Path, bench: Bench) -> PredictionSet:
    """Our JSONL, the official ``model_vqa.py`` JSONL or a ``WSI-Metric`` CSV, matched to ``bench``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WsiLlavaError(f"--predictions {path}: no such file")
    keys = bench.by_key()
    index = question_index(bench.items)
    answers: dict[tuple[str, str], str] = {}
    unmatched: list[str] = []
    duplicates: list[str] = []

    def add(key: tuple[str, str] | None, label: str, answer: str) -> None:
        if key is None or key not in keys:
            unmatched.append(label)
        else:
            if key in answers:
                duplicates.append(label)
            answers[key] = answer

    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            cols = set(reader.fieldnames or [])
            if not {"question_id", "model_output"} <= cols:
                raise WsiLlavaError(
                    f"{path}: a WSI-Metric CSV needs columns question_id, model_output (found {sorted(cols)})"
                )
            for row in reader:
                qid = str(row["question_id"])
                add(index.get(qid), qid, str(row["model_output"] or ""))
    else:
        for i, row in _iter_jsonl(path):
            where = f"{path} line {i}"
            answer = _row_answer(row, where)
            if "task" in row and "id" in row:
                key = (canonical_task(str(row["task"])), str(row["id"]))
                add(key, f"{key[0]}/{key[1]}", answer)
            elif "question_id" in row:
                qid = str(row["question_id"])
                add(index.get(qid), qid, answer)
            else:
                raise WsiLlavaError(f"{where}: needs 'task' and 'id', or 'question_id', to match a question")
    if not answers:
        sample = ", ".join(unmatched[:3])
        raise WsiLlavaError(
            f"--predictions {path}: none of its {len(unmatched)} rows matches a question of the bench "
            f"(e.g. {sample}); check that predictions and --bench are the same benchmark"
        )
    if unmatched:
        logger.warning(
            "%s: %d prediction rows match no bench question (first: %s)", path, len(unmatched), unmatched[0]
        )
    if duplicates:
        logger.warning(
            "%s: %d rows answer a question that an earlier row already answered (first: %s); "
            "the last row of each question is scored",
            path,
            len(duplicates),
            duplicates[0],
        )
    return PredictionSet(answers=answers, unmatched=unmatched, duplicates=len(duplicates), source=str(path))
