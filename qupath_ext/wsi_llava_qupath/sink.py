"""The ``qupath`` result sink (DESIGN §5): answers asked from QuPath are written back into QuPath.

The bridge's commands hand every finished ``Answer`` to all registered sinks (:func:`deliver`), with a
context naming the bridge and the annotation asked about; this sink writes the answer into that
annotation, or adds a whole-image annotation for a whole-slide answer. Answers from other frontends
(no bridge in the context) are ignored, and other plugins' sinks see the same answers.
"""

from __future__ import annotations

import logging
from typing import Any

from wsi_llava.annotate import AnnotationUpdate, apply_to_properties, update_from_answer
from wsi_llava.answer import Answer
from wsi_llava.errors import WsiLlavaError

logger = logging.getLogger(__name__)

SINK_NAME = "qupath"
WHOLE_SLIDE_NAME = "WSI-LLaVA: whole slide"


def whole_slide_feature(update: AnnotationUpdate, width: int, height: int) -> dict[str, Any]:
    """A new annotation covering the whole image, carrying ``update`` as QuPath properties."""
    props = apply_to_properties(
        {"objectType": "annotation", "name": WHOLE_SLIDE_NAME}, update, overwrite=True
    )
    box = [[0, 0], [width, 0], [width, height], [0, height], [0, 0]]
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [box]}, "properties": props}


def qupath_sink(answer: Answer, context: dict[str, Any]) -> None:
    """Write ``answer`` into QuPath when ``context`` names a bridge (``qupath_bridge``).

    ``qupath_annotation``: the annotation asked about (None for a whole-slide answer, which becomes a
    new annotation); optional ``overwrite``, ``set_name``, ``refresh`` (default True: redraw QuPath now).
    """
    bridge = context.get("qupath_bridge")
    if bridge is None:
        return
    annotation = context.get("qupath_annotation")
    update = update_from_answer(answer, set_name=bool(context.get("set_name", False)))
    if annotation is not None:
        bridge.write(annotation, update, overwrite=bool(context.get("overwrite", False)))
    elif answer.scope == "slide":
        info = bridge.image_info()
        bridge.add_annotation(whole_slide_feature(update, info.width, info.height))
    else:
        logger.warning("a region answer without its QuPath annotation: not written")
        return
    if context.get("refresh", True):
        bridge.refresh()


def deliver(answer: Answer, context: dict[str, Any]) -> list[str]:
    """Hand ``answer`` to every registered result sink; returns a message for each other sink that failed.

    A failure of the QuPath sink (the answer did not reach QuPath) is raised after the others have run.
    """
    from wsi_llava.plugins import sinks

    failures: list[str] = []
    qupath_error: WsiLlavaError | None = None
    for entry in sinks().values():  # names are unique: one of them is this QuPath sink
        try:
            entry.fn(answer, context)
        except Exception as e:  # another plugin's failure must not lose the answer
            if entry.name != SINK_NAME:
                logger.warning("result sink %s failed", entry.name, exc_info=True)
                failures.append(
                    f"result sink {entry.name!r} ({entry.plugin}) failed: {type(e).__name__}: {e}"
                )
            elif isinstance(e, WsiLlavaError):
                qupath_error = e
            else:
                raise
    if qupath_error is not None:
        raise qupath_error
    return failures
