"""The ``/v1`` wire format of ``wsi-llava serve``: request bodies, replies and stream events.

One set of pydantic models shared by the server, the Python client (CLI, napari, QuPath bridge) and the
docs (FastAPI publishes them at ``/docs``). The answer on the wire is the CLI's ``ask --json``
(:class:`~wsi_llava.answer.Answer`); a described collection is the offline ``describe`` command's output.

Streams are server-sent events (``Accept: text/event-stream``): ``progress`` and ``token`` events, then
exactly one final event, ``answer`` / ``describe`` on success or ``error``. Every error reply and error
event carries :class:`ErrorBody`.

Requests are strict (the server answers 422 to a field it does not know); replies are read with
:func:`parse_reply`, which ignores unknown fields at every level, so an older client keeps working with a
newer server of the same API version that added some.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from wsi_llava.answer import Answer
from wsi_llava.slide.region import Region

#: the API's major version: a client and a server of different API versions refuse each other
API_VERSION = "v1"
#: header every reply carries: the server's package version
VERSION_HEADER = "X-WSI-LLaVA-Version"
#: the ``slide`` of a request names an uploaded slide by this prefix + the sha256 of its bytes
UPLOAD_PREFIX = "upload:"
#: the kinds of error code an :class:`ErrorBody` carries (the HTTP status says the same in numbers)
ErrorCode = Literal[
    "bad_request",  # 400: a WsiLlavaError about the input (unreadable slide, region off the slide, ...)
    "unauthorized",  # 401: no bearer token where the server needs one
    "forbidden",  # 403: wrong token, or a slide path outside --slides-root
    "not_found",  # 404: no such slide, upload, model or job
    "too_large",  # 413: request body or upload over the server's limit
    "invalid",  # 422: the body does not match the schema
    "busy",  # 429: the queue is full (Retry-After says when to try again)
    "cancelled",  # the job or answer was cancelled
    "draining",  # 503: the server is shutting down
    "timeout",  # 504: the request ran past the server's per-request limit
    "internal",  # 500: a bug; the server log has the details, the reply has no trace
]


M = TypeVar("M", bound=BaseModel)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def parse_reply(model: type[M], data: str | bytes) -> M:
    """``model`` from a server's reply or event JSON, unknown fields ignored in it and every nested model.

    The models stay strict where they are built and where requests are checked; only what a server sends
    back is read leniently, so fields a newer server adds do not break this client.
    """
    return model.model_validate_json(data, extra="ignore")


class ErrorDetail(_Strict):
    code: ErrorCode
    message: str = Field(description="one sentence naming the file, field or limit at fault")


class ErrorBody(_Strict):
    """The body of every error reply and of the ``error`` stream event."""

    error: ErrorDetail


# --- server and models ----------------------------------------------------------------------------------
class WorkerInfo(_Strict):
    """One model worker process of a server started with several devices (``QueueState.workers_detail``)."""

    index: int
    device: str
    pid: int | None = None
    alive: bool
    state: Literal["starting", "running", "restarting", "stopped"] = Field(
        "running", description="'restarting': it stopped and is being started again after a pause"
    )
    restarts: int = Field(0, description="times it was started again after it stopped")
    routed: int = Field(0, description="requests routed to it (by slide) since the server started")
    in_hand: int = Field(0, description="requests sent to it and not answered yet")
    running: int = Field(0, description="questions it is answering now (decoding or extracting)")
    extractions: int = Field(0, description="slide feature sets it has obtained since it started")
    cancelled: int = Field(0, description="requests it stopped because they were cancelled")


class QueueState(_Strict):
    running: int = Field(0, description="questions being answered now (in the decode batch or extracting)")
    queued: int = Field(0, description="requests waiting for a slot")
    capacity: int = Field(description="queued requests beyond which the server answers 429")
    extractions: int = Field(
        0,
        description="slide feature sets this server has obtained (extracted or read from the cache) since "
        "it started: one per slide and model, however many requests asked",
    )
    workers_detail: list[WorkerInfo] | None = Field(
        None, description="per model worker process, when the server runs several (--devices / --workers)"
    )


class Health(_Strict):
    """``GET /v1/health`` (no token needed): enough for a client to check what it talks to."""

    status: Literal["ok", "draining"]
    version: str = Field(description="the server's wsi-llava package version")
    api: str = API_VERSION
    models: list[str] = Field(description="names a request's 'model' may take; the first is the default")
    workers: int = Field(description="model worker processes (one per GPU)")
    auth: bool = Field(description="whether the other endpoints need a bearer token")
    queue: QueueState


class ModelInfo(_Strict):
    name: str
    default: bool = False
    demo: bool = False
    description: str = ""


class ModelList(_Strict):
    """``GET /v1/models``."""

    models: list[ModelInfo]


# --- slides ---------------------------------------------------------------------------------------------
class SlideRef(_Strict):
    """``POST /v1/slides`` (the slide's bytes as the body, ``X-Filename`` header): the stored upload."""

    slide: str = Field(description="what later requests pass as 'slide': 'upload:' + sha256 of the bytes")
    sha256: str
    size: int = Field(description="bytes stored")
    filename: str = Field(description="the name the upload is stored under (its extension picks the reader)")
    existing: bool = Field(False, description="the same bytes were uploaded before; nothing new was stored")


class Rectangle(_Strict):
    """A rectangle in level-0 pixels (the CLI's ``--region x,y,w,h``)."""

    x: float
    y: float
    width: float
    height: float

    def to_region(self) -> Region:
        return Region.rectangle(self.x, self.y, self.width, self.height, source="rectangle")


class _SlideRequest(_Strict):
    slide: str = Field(
        description="a path under the server's --slides-root (relative to it, or absolute inside it), "
        "or 'upload:<sha256>' from POST /v1/slides"
    )
    model: str | None = Field(None, description="a name from GET /v1/models; default: the server's first")


class ExtractRequest(_SlideRequest):
    """``POST /v1/extract``: featurize a slide now (a job), so later questions start at once."""


class GenerationSettings(_Strict):
    max_new_tokens: int | None = Field(None, ge=1, description="default: the model's")
    temperature: float | None = Field(None, ge=0, description="0: greedy; default: the model's")
    seed: int | None = None


class AskRequest(_SlideRequest, GenerationSettings):
    """``POST /v1/ask``: one question about the whole slide, a rectangle, or a GeoJSON geometry.

    At most one of ``region``, ``rectangle`` and ``geometry``; none means the whole slide.
    """

    question: str = Field(min_length=1)
    region: Region | None = Field(None, description="a polygon as the CLI's --json reports regions")
    rectangle: Rectangle | None = None
    geometry: dict[str, Any] | None = Field(
        None, description="a GeoJSON Polygon or MultiPolygon geometry in level-0 px (QuPath's own)"
    )
    evidence: bool = Field(True, description="compute per-tile relevance (costs one backward pass chain)")

    @model_validator(mode="after")
    def _one_scope(self) -> AskRequest:
        given = [k for k in ("region", "rectangle", "geometry") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of region, rectangle and geometry (got {', '.join(given)})")
        return self


class EvidenceRequest(_Strict):
    """Which relevant tiles ``describe`` writes as detections (as ``describe --evidence``)."""

    mass: float = Field(0.9, gt=0, le=1)
    max_tiles: int = Field(300, ge=1)


class DescribeRequest(_SlideRequest, GenerationSettings):
    """``POST /v1/describe``: ask one question about every polygon annotation of a FeatureCollection."""

    features: dict[str, Any] = Field(
        description="a GeoJSON FeatureCollection (a QuPath export); every feature and property is kept"
    )
    question: str = Field("Describe the tissue in this region.", min_length=1)
    overwrite: bool = Field(False, description="replace existing descriptions instead of appending")
    set_name: bool = Field(False, description="also set a short name from the answer")
    evidence: EvidenceRequest | None = Field(
        None, description="also add each answer's relevant tiles as detections"
    )


class RegionOutcome(_Strict):
    """One annotation of a describe request: its answer, or why it failed (the batch goes on)."""

    index: int = Field(description="position among the collection's polygon annotations")
    label: str
    answer: Answer | None = None
    error: str | None = None


class DescribeResult(_Strict):
    """The reply to ``describe`` (and its final ``describe`` stream event)."""

    features: dict[str, Any] = Field(description="the collection, described annotations updated")
    results: list[RegionOutcome]
    described: int
    evidence_added: int = 0
    evidence_removed: int = 0
    notice: str | None = None
    warning: str | None = None


# --- jobs -----------------------------------------------------------------------------------------------
JobStateName = Literal["queued", "running", "done", "failed", "cancelled"]


class Progress(_Strict):
    """The ``progress`` event, and a job's latest progress."""

    done: int = 0
    total: int = 0
    message: str = ""


class Job(_Strict):
    """``GET /v1/jobs/{id}`` (``DELETE`` cancels it): an extraction or a describe run."""

    id: str
    kind: Literal["extract", "describe"]
    state: JobStateName
    slide: str
    model: str
    progress: Progress = Field(default_factory=Progress)
    error: ErrorDetail | None = None
    result: DescribeResult | None = None


# --- stream events --------------------------------------------------------------------------------------
class TokenEvent(_Strict):
    """The ``token`` event: the next piece of the answer's text, as ``ask`` streams it."""

    text: str


#: SSE event names, in the order a stream may send them (``answer``, ``describe``, ``job`` and ``error`` end
#: it; ``job``, a :class:`Job`, ends ``GET /v1/jobs/{id}/events``)
EVENTS = ("progress", "token", "result", "answer", "describe", "job", "error")
