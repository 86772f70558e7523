"""The napari result sink, a plugin of the core (DESIGN §5): answers go into a Shapes layer's features.

Registered with the core's plugin manager when the widget is created; the widget hands every finished
``Answer`` to all registered sinks with a context naming the layer and shape it belongs to.
"""

from __future__ import annotations

import logging
from typing import Any

from napari_wsi_llava._shapes import COLUMNS, TEXT, normalise_features, short_label
from wsi_llava.answer import Answer
from wsi_llava.hookspecs import hookimpl

logger = logging.getLogger(__name__)

PLUGIN_NAME = "napari_wsi_llava.sink"
SINK_NAME = "napari-shapes"


def write_answer_to_shapes(answer: Answer, context: dict[str, Any]) -> None:
    """Store ``answer`` on shape ``context["shape_index"]`` of ``context["shapes_layer"]``.

    ``context["target"] == "description"`` writes the text as the shape's description (QuPath's
    annotation description); otherwise it is the shape's answer. Whole-slide answers have no shape.
    """
    layer = context.get("shapes_layer")
    index = context.get("shape_index")
    if context.get("frontend") != "napari" or layer is None or index is None:
        return
    if not 0 <= index < len(layer.data):
        logger.warning("shape %s no longer exists on %r; answer kept in the history only", index, layer.name)
        return
    features = normalise_features(layer.features, len(layer.data))
    text = answer.answer
    if context.get("target") == "description":
        features.loc[index, "description"] = text
    else:
        features.loc[index, "question"] = answer.question
        features.loc[index, "answer"] = text
        features.loc[index, "model"] = answer.model
    row = features.loc[index]
    features.loc[index, "label"] = short_label(str(row["name"]), str(row["answer"] or row["description"]))
    layer.features = features
    defaults = dict.fromkeys(COLUMNS, "")
    layer.feature_defaults = defaults
    if getattr(layer.text.string, "format", None) != TEXT["string"]:  # a layer the user made: show labels
        layer.text = dict(TEXT)
    layer.refresh_text()


class NapariSink:
    """pluggy plugin object contributing :func:`write_answer_to_shapes` as a result sink."""

    @hookimpl
    def register_sinks(self, register):
        register(SINK_NAME, write_answer_to_shapes, description="answers into a napari Shapes layer")


def ensure_registered() -> None:
    """Register the napari sink with the core's plugin manager once per process."""
    from wsi_llava.plugins import get_plugin_manager, register_plugin

    if get_plugin_manager().get_plugin(PLUGIN_NAME) is None:
        register_plugin(NapariSink(), PLUGIN_NAME)
