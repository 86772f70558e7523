"""The ``qupath`` result sink (DESIGN §5): answers asked from QuPath are written back into QuPath.

The bridge's commands hand every finished ``Answer`` to all registered sinks (:func:`deliver`), with a
context naming the bridge and the annotation asked about; this sink writes the answer into that
annotation, or adds a whole-image annotation for a whole-slide answer, and, when asked, the answer's
relevant tiles as evidence detections below it (:mod:`wsi_llava.evidence_tiles`). Answers from other
frontends (no bridge in the context) are ignored, and other plugins' sinks see the same answers.
"""

from __future__ import annotations

import logging
from typing import Any

from wsi_llava.annotate import apply_to_properties, update_from_answer
from wsi_llava.answer import Answer
from wsi_llava.errors import WsiLlavaError
from wsi_llava.evidence_tiles import EvidenceSelection, evidence_features

logger = logging.getLogger(__name__)

SINK_NAME = "qupath"
WHOLE_SLIDE_NAME = "WSI-LLaVA: whole slide"


def whole_slide_feature(width: int, height: int) -> dict[str, Any]:
    """A new annotation covering the whole image, named but with no answer yet (:func:`qupath_sink` writes it)."""
    box = [[0, 0], [width, 0], [width, height], [0, height], [0, 0]]
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [box]},
        "properties": {"objectType": "annotation", "name": WHOLE_SLIDE_NAME},
    }


def qupath_sink(answer: Answer, context: dict[str, Any]) -> None:
    """Write ``answer`` into QuPath when ``context`` names a bridge (``qupath_bridge``).

    ``qupath_annotation``: the annotation asked about (None for a whole-slide answer, which becomes a
    new annotation); optional ``overwrite``, ``set_name``, ``refresh`` (default True: redraw QuPath now),
    ``evidence`` (an ``EvidenceSelection``: also add the answer's relevant tiles as detections). The
    evidence tiles go in before the answer's text, so a failure between the two leaves no description
    without its tiles.
    """
    bridge = context.get("qupath_bridge")
    if bridge is None:
        return
    annotation = context.get("qupath_annotation")
    selection: EvidenceSelection | None = context.get("evidence")
    update = update_from_answer(answer, set_name=bool(context.get("set_name", False)))
    if annotation is not None:
        target, props = annotation.java_object, annotation.region.properties
        write = bridge.prepare_write(target, props, update, overwrite=bool(context.get("overwrite", False)))
        replaced = [target]  # its own earlier evidence
    elif answer.scope == "slide":
        info = bridge.image_info()
        replaced = []  # the evidence of earlier whole-slide answers
        if selection is not None:
            replaced = [
                a.java_object for a in bridge.annotations(selected=False) if a.region.name == WHOLE_SLIDE_NAME
            ]
        feature = whole_slide_feature(info.width, info.height)
        props = feature["properties"]
        apply_to_properties(props, update, overwrite=True)  # refuses a bad update before the first change
        target = bridge.add_annotation(feature)
        write = bridge.prepare_write(target, props, update, overwrite=True)
    else:
        logger.warning("a region answer without its QuPath annotation: not written")
        return
    if selection is not None:
        legacy = isinstance(props.get("measurements"), list)
        features = evidence_features(answer.evidence, selection, legacy_measurements=legacy)
        bridge.put_detections(target, features, replace=bridge.evidence_children(replaced))
    write()
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
