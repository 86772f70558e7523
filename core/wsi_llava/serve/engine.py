"""The model side of ``wsi-llava serve``: models loaded once, slides featurized once, answers decoded in batches.

One :class:`Engine` per server process. Each ``--model`` is loaded once and decodes through its own
continuous-batching :class:`~wsi_llava.model.batching.Batcher`; open slides are kept in an LRU of
:class:`~wsi_llava.session.SlideSession` keyed by model and resolved path, so a slide's features are
extracted once (concurrent first requests wait on one extraction) and reused by every later request.
Work on the model other than decode steps (slide encoder, evidence pass) runs through ``Batcher.call``,
between decode steps. Every public method is blocking: the app runs them in worker threads.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_llava.answer import Answer
from wsi_llava.errors import AnnotationError, Cancelled, WsiLlavaError
from wsi_llava.progress import CancelToken, ProgressCallback
from wsi_llava.serve.config import ServeConfig
from wsi_llava.serve.schemas import (
    UPLOAD_PREFIX,
    AskRequest,
    DescribeRequest,
    DescribeResult,
    ModelInfo,
    Progress,
    QueueState,
    RegionOutcome,
    TokenEvent,
)
from wsi_llava.serve.security import ApiError, confine
from wsi_llava.serve.uploads import UploadStore
from wsi_llava.slide.region import Region

logger = logging.getLogger(__name__)

#: ``emit(event name, pydantic model)``: how the engine streams events to a request
Emit = Callable[[str, Any], None]


class Ticket:
    """One request's cancel token and the reason it was cancelled (``cancelled``, ``timeout``, ``draining``)."""

    def __init__(self) -> None:
        self.token = CancelToken()
        self.reason: str | None = None

    def cancel(self, reason: str = "cancelled") -> None:
        if self.reason is None:
            self.reason = reason
        self.token.cancel()

    @property
    def cancelled(self) -> bool:
        return self.token.cancelled


@dataclass
class ModelSlot:
    """A loaded model and the batcher that decodes for it."""

    name: str
    model: Any
    batcher: Any


@dataclass
class _OpenSlide:
    """An LRU entry: the session (built on first use), whether its features are in, who is using it."""

    key: tuple[str, str, int, int]
    lock: threading.Lock = field(default_factory=threading.Lock)
    session: Any = None
    ready: bool = False
    users: int = 0
    evicted: bool = False


def request_region(req: AskRequest) -> Region | None:
    """The region an ask request names (``region``, ``rectangle`` or GeoJSON ``geometry``), None for the slide."""
    if req.region is not None:
        return req.region
    if req.rectangle is not None:
        return req.rectangle.to_region()
    if req.geometry is not None:
        from wsi_llava.slide.geojson import geometry_to_region

        return geometry_to_region(req.geometry, "geometry")
    return None


class Engine:
    """Models, open slides, the admission queue and drain state of one server process."""

    def __init__(self, config: ServeConfig, loader: Callable[..., Any] | None = None) -> None:
        self.config = config
        self.uploads = UploadStore(config.uploads_dir(), config.max_upload_bytes)
        self._loader = loader
        self.slots: dict[str, ModelSlot] = {}
        self._slides: OrderedDict[tuple[str, str, int, int], _OpenSlide] = OrderedDict()
        self._lock = threading.Lock()
        self._inflight: set[Ticket] = set()
        self._extracting = 0
        self.extractions = 0
        self.draining = False
        self.device = "cpu"

    # --- models ------------------------------------------------------------------------------
    def load(self) -> None:
        """Load every ``--model`` once (before the server listens); a bad name fails start-up."""
        from wsi_llava.model import load_model
        from wsi_llava.model.batching import Batcher
        from wsi_llava.settings import resolve_device, using_cache_dir

        self.device = resolve_device(self.config.device)
        loader = self._loader or load_model
        for name in self.config.models:
            with using_cache_dir(self.config.cache):
                model = loader(name, device=self.device)
            batcher = Batcher(model, max_batch=self.config.max_batch)
            self.slots[name] = ModelSlot(name, model, batcher)
            logger.info("model %s loaded on %s", name, self.device)
            batcher.warm()  # CUDA graphs: the decode buffers and steps now, not in the first users' wait

    @property
    def names(self) -> list[str]:
        return list(self.config.models)

    def slot(self, name: str | None) -> ModelSlot:
        """The model a request names (the first ``--model`` when None); 404 for one this server has not."""
        name = name or self.config.models[0]
        slot = self.slots.get(name)
        if slot is None:
            raise ApiError(
                404, "not_found", f"model {name!r}: not served here (models: {', '.join(self.names)})"
            )
        return slot

    def model_infos(self) -> list[ModelInfo]:
        out = []
        for i, name in enumerate(self.names):
            spec = self.slots[name].model.spec if name in self.slots else None
            out.append(
                ModelInfo(
                    name=name,
                    default=i == 0,
                    demo=bool(spec and spec.demo),
                    description=(spec.description or "") if spec else "",
                )
            )
        return out

    # --- admission ---------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.config.max_batch + self.config.queue

    def queue_state(self) -> QueueState:
        with self._lock:
            inflight = len(self._inflight)
            extracting = self._extracting
        active = sum(int(getattr(s.batcher, "active", 0)) for s in self.slots.values())
        running = min(inflight, active + extracting)
        return QueueState(
            running=running,
            queued=max(0, inflight - running),
            capacity=self.config.queue,
            extractions=self.extractions,
        )

    @contextlib.contextmanager
    def admitted(self, ticket: Ticket) -> Iterator[Ticket]:
        """Hold one of the server's request slots for ``ticket``: 503 while draining, 429 when all are taken."""
        self.admit(ticket)
        try:
            yield ticket
        finally:
            self.release(ticket)

    def admit(self, ticket: Ticket) -> None:
        with self._lock:
            if self.draining:
                raise ApiError(503, "draining", "the server is shutting down; try another or later")
            if len(self._inflight) >= self.capacity:
                raise ApiError(
                    429,
                    "busy",
                    f"the server is busy ({len(self._inflight)} requests in hand, queue of "
                    f"{self.config.queue} full); try again shortly",
                    headers={"Retry-After": "2"},
                )
            self._inflight.add(ticket)

    def release(self, ticket: Ticket) -> None:
        with self._lock:
            self._inflight.discard(ticket)

    def drain(self, grace: float) -> int:
        """Refuse new requests; wait up to ``grace`` s for those in hand, then cancel the rest ('draining').

        Returns how many were cancelled.
        """
        with self._lock:
            self.draining = True
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            with self._lock:
                if not self._inflight:
                    return 0
            time.sleep(0.05)
        with self._lock:
            left = list(self._inflight)
        for t in left:
            t.cancel("draining")
        stop = time.monotonic() + 10
        while time.monotonic() < stop:
            with self._lock:
                if not self._inflight:
                    break
            time.sleep(0.05)
        return len(left)

    # --- slides ------------------------------------------------------------------------------
    def slide_path(self, slide: str) -> Path:
        """The file a request's ``slide`` names: an upload, or a path confined to ``--slides-root``."""
        if slide.startswith(UPLOAD_PREFIX):
            return self.uploads.find(slide)
        return confine(slide, self.config.slides_root)

    @contextlib.contextmanager
    def open_slide(self, slot: ModelSlot, path: Path, ticket: Ticket) -> Iterator[_OpenSlide]:
        """The LRU entry of ``path`` under ``slot``'s model, its session built (no features yet)."""
        st = path.stat()
        key = (slot.name, str(path), st.st_mtime_ns, st.st_size)
        with self._lock:
            entry = self._slides.get(key)
            if entry is None:
                entry = self._slides[key] = _OpenSlide(key)
            self._slides.move_to_end(key)
            entry.users += 1
            evict = self._evictable()
        for old in evict:
            self._close(old)
        try:
            with self._locked(entry, ticket):
                if entry.session is None:
                    from wsi_llava.session import SlideSession

                    entry.session = SlideSession(
                        path, slot.model, cache_dir=self.config.cache, device=self.device
                    )
            yield entry
        finally:
            with self._lock:
                entry.users -= 1
                close = entry.evicted and entry.users == 0
            if close:
                self._close(entry)

    def _evictable(self) -> list[_OpenSlide]:
        out = []
        for key in list(self._slides):
            if len(self._slides) - len(out) <= self.config.max_sessions:
                break
            entry = self._slides[key]
            if entry.users == 0:
                out.append(self._slides.pop(key))
        return out

    def _close(self, entry: _OpenSlide) -> None:
        entry.evicted = True
        if entry.session is not None:
            with contextlib.suppress(Exception):
                entry.session.close()
            entry.session = None

    @contextlib.contextmanager
    def _locked(self, entry: _OpenSlide, ticket: Ticket) -> Iterator[None]:
        while not entry.lock.acquire(timeout=0.1):
            ticket.token.raise_if_cancelled()
        try:
            yield
        finally:
            entry.lock.release()

    def features(self, entry: _OpenSlide, ticket: Ticket, progress: ProgressCallback) -> None:
        """The slide's features, extracted (or read from the cache) once; others wait on that one."""
        if entry.ready:
            return
        with self._locked(entry, ticket):
            if entry.ready:
                return
            with self._lock:
                self._extracting += 1
            try:
                entry.session.extract(progress=progress, cancel=ticket.token)
            finally:
                with self._lock:
                    self._extracting -= 1
            entry.ready = True
            self.extractions += 1
            logger.info("features of %s ready (%s)", entry.key[1], entry.key[0])

    def extract(self, slide: str, model: str | None, ticket: Ticket, progress: ProgressCallback) -> None:
        """An extract job: featurize ``slide`` now so later questions start at once."""
        slot = self.slot(model)
        path = self.slide_path(slide)
        with self.open_slide(slot, path, ticket) as entry:
            self.features(entry, ticket, progress)

    # --- questions ---------------------------------------------------------------------------
    def ask(self, req: AskRequest, ticket: Ticket, emit: Emit) -> Answer:
        """Answer one question; ``emit`` gets ``progress`` and ``token`` events on the way."""
        slot = self.slot(req.model)
        path = self.slide_path(req.slide)
        region = request_region(req)
        with self.open_slide(slot, path, ticket) as entry:
            return self._answer(slot, entry, req.question, region, req, req.evidence, ticket, emit)

    def _answer(
        self,
        slot: ModelSlot,
        entry: _OpenSlide,
        question: str,
        region: Region | None,
        settings: Any,
        evidence: bool,
        ticket: Ticket,
        emit: Emit | None,
    ) -> Answer:
        """What ``SlideSession.ask_stream`` does, with the decode in ``slot``'s batch."""
        s = entry.session
        t0 = time.perf_counter()
        indices = s.scope(
            question, region, max_new_tokens=settings.max_new_tokens, temperature=settings.temperature
        )
        t_feat0 = time.perf_counter()
        self.features(entry, ticket, _progress_emitter(emit))
        scope = "region" if region is not None else "slide"
        visual, warnings = slot.batcher.call(
            lambda: (s.visual_tokens(indices), s.feature_warnings(indices, scope))
        )
        t_features = time.perf_counter() - t_feat0
        ticket.token.raise_if_cancelled()
        t_submit = time.perf_counter()
        stream = slot.batcher.submit(
            s.model_question(question, region),
            visual,
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            seed=settings.seed,
            cancel=ticket.token,
        )
        finished = False
        t_first = None
        try:
            for chunk in stream:
                if t_first is None:
                    t_first = time.perf_counter()
                    logger.debug(  # where a streamed answer's time to first token goes
                        "ask: scope %.3f s, features and visual tokens %.3f s, first token %.3f s after submit",
                        t_feat0 - t0,
                        t_features,
                        t_first - t_submit,
                    )
                if emit is not None:
                    emit("token", TokenEvent(text=chunk))
            finished = True
        finally:
            if not finished:
                stream.cancel()
        gen = stream.result
        if gen is None or gen.stop_reason == "cancelled":
            raise Cancelled("answer cancelled")
        return slot.batcher.call(
            lambda: s.build_answer(
                question,
                region,
                indices,
                gen,
                evidence=evidence,
                warnings=warnings,
                t0=t0,
                t_features=t_features,
            )
        )

    def describe(self, req: DescribeRequest, ticket: Ticket, emit: Emit | None) -> DescribeResult:
        """Describe every polygon annotation of ``req.features`` as ``wsi-llava describe`` does."""
        from wsi_llava.describe import DescribeReport, describe_one, described_collection, select_features
        from wsi_llava.evidence_tiles import EvidenceSelection
        from wsi_llava.slide.geojson import parse_geojson, printable

        if not req.question.strip():
            raise WsiLlavaError("question is empty: type a question for the annotations")
        slot = self.slot(req.model)
        path = self.slide_path(req.slide)
        gj, idx, regions = select_features(parse_geojson(req.features, "features"))
        if not regions:
            raise AnnotationError("features: no polygon annotations to describe")
        progress = _progress_emitter(emit)
        results = []
        with self.open_slide(slot, path, ticket) as entry:
            self.features(entry, ticket, progress)
            dims = entry.session.reader.dimensions
            progress(0, len(regions), "describing annotations")
            for i, region in enumerate(regions):
                ticket.token.raise_if_cancelled()
                result = describe_one(
                    i,
                    region,
                    lambda r: self._answer(
                        slot, entry, req.question, r, req, True, ticket, None
                    ),  # as describe does
                    dims,
                    overwrite=req.overwrite,
                    set_name=req.set_name,
                )
                results.append(result)
                if emit is not None:
                    emit("result", _outcome(result))
                progress(i + 1, len(regions), "describing annotations")
        report = DescribeReport(question=req.question, results=results)
        if report.n_ok == 0:
            reasons = "; ".join(f"{printable(r.label)}: {r.error}" for r in report.failures)
            raise WsiLlavaError(f"no annotation was described ({reasons})")
        ok = [r for r in results if r.ok]
        selection = None
        answered: list[tuple[Region, Answer]] = []
        if req.evidence is not None:
            selection = EvidenceSelection(mass=req.evidence.mass, max_tiles=req.evidence.max_tiles)
            answered = [(r.region, r.answer) for r in ok if r.answer is not None]
        document, removed, added = described_collection(
            gj, {idx[r.index]: r.region for r in ok}, answered, selection
        )
        notice = next((r.answer.notice for r in results if r.answer and r.answer.notice), None)
        return DescribeResult(
            features=document,
            results=[_outcome(r) for r in results],
            described=report.n_ok,
            evidence_added=added,
            evidence_removed=removed,
            notice=notice,
            warning=report.warning,
        )

    def close(self) -> None:
        for slot in self.slots.values():
            with contextlib.suppress(Exception):
                slot.batcher.close()
        with self._lock:
            entries = list(self._slides.values())
            self._slides.clear()
        for entry in entries:
            self._close(entry)


def _outcome(result: Any) -> RegionOutcome:
    return RegionOutcome(index=result.index, label=result.label, answer=result.answer, error=result.error)


def _progress_emitter(emit: Emit | None) -> ProgressCallback:
    def progress(done: int, total: int, message: str) -> None:
        if emit is not None:
            emit("progress", Progress(done=done, total=total, message=message))

    return progress
