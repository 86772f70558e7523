"""``Answer``: what a question about a slide or region returns, serialisable to JSON."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from wsi_llava.slide.region import Region


class Evidence(BaseModel):
    """Per-tile relevance of the answer: how much each tile made it more likely, with level-0 coordinates."""

    model_config = ConfigDict(extra="forbid")

    tile_indices: list[int] = Field(default_factory=list, description="indices into the slide's tile grid")
    coords: list[tuple[int, int]] = Field(
        default_factory=list, description="tile top-left, level-0 px (x, y)"
    )
    scores: list[float] = Field(
        default_factory=list,
        description="relevance to the answer (not a diagnosis), sums to 1 over the tiles",
    )
    tile_size: int = Field(0, description="tile edge in level-0 px")
    method: str = "integrated gradients of the answer's log-probability w.r.t. tile features"


class Timings(BaseModel):
    """Seconds spent in each step; ``features`` is ~0 when the cache was reused."""

    model_config = ConfigDict(extra="forbid")

    features: float = 0.0
    prefill: float = 0.0
    decode: float = 0.0
    seconds: float = 0.0
    new_tokens: int = 0
    decode_path: str | None = Field(
        None, description="how the answer was decoded (eager, graph, compile, batched, batched-graph)"
    )


class Answer(BaseModel):
    """One answered question."""

    model_config = ConfigDict(extra="forbid")

    question: str
    answer: str
    scope: Literal["slide", "region"]
    region: Region | None = None
    model: str
    demo: bool = False
    notice: str | None = None
    warnings: list[str] = Field(
        default_factory=list,
        description="caveats about this answer that the user must see, e.g. tiles outside the model's training data",
    )
    slide: str | None = None
    evidence: Evidence = Field(default_factory=Evidence)
    timings: Timings = Field(default_factory=Timings)
