"""Write answers into annotations the QuPath way: description, optional name, numeric measurements.

QuPath keeps an annotation's description in ``properties["metadata"]["ANNOTATION_DESCRIPTION"]``
(``PathAnnotationObject.setDescription``), its name in ``properties["name"]`` and numbers in
``properties["measurements"]`` (an object ``{name: number}``, or the older list of ``{name, value}``).
An existing description is kept and the answer appended under a dated heading unless ``overwrite``;
no other property is touched. The same :class:`AnnotationUpdate` drives GeoJSON files (here), QuPath
objects over py4j (the bridge) and napari Shapes features.
"""

from __future__ import annotations

import copy
import math
import re
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from wsi_llava.answer import Answer
from wsi_llava.slide.region import Region

#: QuPath's metadata key for an annotation's description
DESCRIPTION_KEY = "ANNOTATION_DESCRIPTION"
#: prefix of the measurements wsi-llava writes
MEASUREMENT_PREFIX = "WSI-LLaVA"
#: longest short name written into ``properties["name"]``
NAME_MAX_CHARS = 48

_NUMBER = re.compile(r"^\s*([-+]?\d+(?:\.\d+)?)\s*(%|percent)?\s*\.?\s*$", re.IGNORECASE)


class AnnotationUpdate(BaseModel):
    """What to write into one annotation: the answer text, a short name, numeric measurements."""

    model_config = ConfigDict(extra="forbid")

    question: str
    answer: str
    name: str | None = Field(None, description="short form for the annotation's name; None keeps the name")
    measurements: dict[str, float] = Field(default_factory=dict)
    when: datetime = Field(default_factory=lambda: datetime.now(UTC))


def short_name(text: str, max_chars: int = NAME_MAX_CHARS) -> str:
    """The first sentence of ``text``, cut at a word boundary to at most ``max_chars`` characters."""
    first = re.split(r"(?<=[.!?])\s+|\n", text.strip(), maxsplit=1)[0].strip().rstrip(".")
    if len(first) <= max_chars:
        return first
    cut = first[: max_chars - 1].rsplit(" ", 1)[0].rstrip(",;: ")
    return (cut or first[: max_chars - 1]) + "…"


def numeric_answer(text: str) -> float | None:
    """The number an answer consists of (``"42"``, ``"12.5 %"``), or None for free text."""
    m = _NUMBER.match(text)
    return float(m.group(1)) if m else None


def update_from_answer(answer: Answer, *, set_name: bool = False) -> AnnotationUpdate:
    """An :class:`AnnotationUpdate` for ``answer``; the demo notice and any warnings stay attached to the text."""
    text = answer.answer.strip()
    if answer.notice:
        text = f"{text}\n[{answer.notice}]"
    for warning in answer.warnings:
        text = f"{text}\n[warning: {warning}]"
    measurements: dict[str, float] = {f"{MEASUREMENT_PREFIX} tiles": float(len(answer.evidence.tile_indices))}
    value = numeric_answer(answer.answer)
    if value is not None:
        measurements[f"{MEASUREMENT_PREFIX} answer"] = value
    return AnnotationUpdate(
        question=answer.question,
        answer=text,
        name=short_name(answer.answer) if set_name and answer.answer.strip() else None,
        measurements=measurements,
    )


def heading(update: AnnotationUpdate) -> str:
    """The dated heading an appended answer goes under."""
    return f"--- WSI-LLaVA, {update.when.strftime('%Y-%m-%d %H:%M UTC')}: {update.question.strip()}"


def merge_description(existing: str | None, update: AnnotationUpdate, overwrite: bool = False) -> str:
    """The new description: the answer alone, or ``existing`` + a dated heading + the answer."""
    if overwrite or not existing or not existing.strip():
        return update.answer
    return f"{existing.rstrip()}\n\n{heading(update)}\n{update.answer}"


def _finite(name: str, value: float) -> float:
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"measurement {name!r} must be a finite number, got {value!r}")
    return v


def apply_to_properties(
    properties: dict[str, Any], update: AnnotationUpdate, overwrite: bool = False
) -> dict[str, Any]:
    """A copy of a QuPath feature's ``properties`` with the update written in; the input is unchanged."""
    props = copy.deepcopy(properties)
    metadata = props.get("metadata")
    metadata = dict(metadata) if isinstance(metadata, dict) else {}
    existing = metadata.get(DESCRIPTION_KEY)
    metadata[DESCRIPTION_KEY] = merge_description(
        existing if isinstance(existing, str) else None, update, overwrite
    )
    props["metadata"] = metadata
    if update.name is not None:
        props["name"] = update.name
    if update.measurements:
        props["measurements"] = merge_measurements(props.get("measurements"), update.measurements)
    return props


def merge_measurements(current: Any, values: dict[str, float]) -> list[dict[str, Any]] | dict[str, Any]:
    """``current`` measurements (as a QuPath feature holds them) with ``values`` set, in the same form.

    QuPath <= 0.3 writes a list of ``{name, value}``, later versions an object; anything else becomes an
    object. The input is unchanged; a non-finite value raises ``ValueError``.
    """
    checked = {k: _finite(k, v) for k, v in values.items()}
    if isinstance(current, list):  # QuPath's older array-of-{name, value} form
        kept = [m for m in current if not (isinstance(m, dict) and m.get("name") in checked)]
        return kept + [{"name": k, "value": v} for k, v in checked.items()]
    merged = dict(current) if isinstance(current, dict) else {}
    merged.update(checked)
    return merged


def annotate_region(region: Region, update: AnnotationUpdate, overwrite: bool = False) -> Region:
    """A copy of ``region`` whose properties (and name, if the update sets one) carry the answer."""
    props = apply_to_properties(region.properties, update, overwrite)
    name = update.name if update.name is not None else region.name
    return region.model_copy(update={"properties": props, "name": name})


def description_of(properties: dict[str, Any]) -> str | None:
    """The QuPath description stored in a feature's ``properties``, if any."""
    metadata = properties.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get(DESCRIPTION_KEY), str):
        return metadata[DESCRIPTION_KEY]
    return None
