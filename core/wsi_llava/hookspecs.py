"""pluggy hook specifications of wsi-llava, in the ``register_*(register)`` style.

Each ``register_*`` hook receives a ``register`` callable; a plugin calls it once per thing it
provides. Built-in readers, encoders and models are registered through the same hooks as
third-party plugins (entry-point group ``wsi_llava``).
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("wsi_llava")
hookimpl = pluggy.HookimplMarker("wsi_llava")


@hookspec
def register_slide_readers(register):
    """Register slide readers: ``register(name, open_fn, suffixes=(".svs", ...), priority=0)``.

    ``open_fn(path: Path, mpp: float | None) -> SlideReader`` raises ``SlideError`` when it cannot
    read the file; the next reader is then tried.
    """


@hookspec
def register_tile_encoders(register):
    """Register tile encoders: ``register(name, build_fn, embed_dim=..., description=...)``.

    ``build_fn(weights: Path | None) -> torch.nn.Module`` returns an encoder that maps a float
    batch ``(B, 3, H, W)`` (already normalised) to ``(B, embed_dim)``.
    """


@hookspec
def register_models(register):
    """Register models: ``register(name, load_fn, description=..., checkpoint=...)``.

    ``load_fn(device: str, dtype: str) -> wsi_llava.model.WSILlava``. Optional ``checkpoint() ->
    (ModelSpec, folder or None)`` lets ``extract --model`` build the tile encoder without the LLM.
    """


@hookspec
def register_judges(register):
    """Register judges for WSI-Precision / WSI-Relevance: ``register(name, factory)``."""


@hookspec
def register_sinks(register):
    """Register result sinks: ``register(name, sink_fn)`` with ``sink_fn(answer, context)``.

    A sink receives every finished ``Answer`` (e.g. to write it into a QuPath annotation or a
    napari Shapes layer); ``context`` is a dict the caller passes through.
    """


@hookspec
def register_commands(cli):
    """Add sub-commands to the ``wsi-llava`` click group ``cli``."""
