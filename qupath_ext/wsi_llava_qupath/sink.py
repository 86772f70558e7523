"""The ``qupath`` result sink: writes a finished ``Answer`` into the QuPath annotation it was asked about."""

from __future__ import annotations

import logging
from typing import Any

from wsi_llava.annotate import update_from_answer
from wsi_llava.answer import Answer

logger = logging.getLogger(__name__)


def write_answer(
    bridge: Any, annotation: Any, answer: Answer, *, overwrite: bool = False, set_name: bool = False
) -> None:
    """Write ``answer`` into ``annotation`` (a ``QuPathAnnotation``) through ``bridge``."""
    bridge.write(annotation, update_from_answer(answer, set_name=set_name), overwrite=overwrite)


def qupath_sink(answer: Answer, context: dict[str, Any]) -> None:
    """Sink for the core's registry: acts only when ``context`` names a QuPath bridge and annotation.

    ``context``: ``qupath_bridge``, ``qupath_annotation``, optional ``overwrite``, ``set_name``,
    ``refresh`` (default True). Answers from other frontends (no such keys) are ignored.
    """
    bridge = context.get("qupath_bridge")
    annotation = context.get("qupath_annotation")
    if bridge is None or annotation is None:
        return
    write_answer(
        bridge,
        annotation,
        answer,
        overwrite=bool(context.get("overwrite", False)),
        set_name=bool(context.get("set_name", False)),
    )
    if context.get("refresh", True):
        bridge.refresh()
