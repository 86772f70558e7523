"""Background work of the widget: its sessions, and a generator of events for napari thread workers.

The core's calls (model load, feature extraction, streamed answers) run in a helper thread and post
events to a queue; :func:`ask_events` yields them, so a napari ``GeneratorWorker`` streams tokens and
progress and ``worker.quit()`` takes effect within ``POLL`` seconds even during a long forward pass.

Each widget owns a :class:`SessionPool`. A session holds an open slide file and its features, so it lives
as long as the image layer it answers about; a loaded model is shared by the widgets of the process and
lives as long as one of them that used it is open.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_llava.errors import Cancelled
from wsi_llava.progress import CancelToken
from wsi_llava.slide.region import Region

logger = logging.getLogger(__name__)

POLL = 0.1

_lock = threading.Lock()  # guards _models, _pools and every pool's tables; held briefly only
_load_lock = threading.Lock()  # one model load at a time (a second asker waits for the first)
_models: dict[str, Any] = {}
_pools: set[SessionPool] = set()


@dataclass
class Job:
    """One question: about the whole slide (``region`` None) or a shape of a Shapes layer."""

    question: str
    region: Region | None = None
    shape_index: int | None = None
    target: str = "answer"  # or "description"
    title: str = "whole slide"


@dataclass(eq=False)
class _Entry:
    """A cached session; ``lock`` is held while a question uses it, ``retired`` once it is dropped."""

    session: Any
    lock: threading.Lock = field(default_factory=threading.Lock)
    retired: bool = False
    closed: bool = False

    def retire(self) -> None:
        """Close now if idle, else when the running question lets go (see :meth:`close_if_retired`)."""
        self.retired = True
        self.close_if_retired()

    def close_if_retired(self) -> None:
        """Close a retired session nobody uses: whichever of dropper and user gets the lock closes it."""
        if self.retired and self.lock.acquire(blocking=False):
            try:
                if not self.closed:
                    self.closed = True
                    self.session.close()
            finally:
                self.lock.release()


def _path_key(slide: str | Path) -> str:
    return str(Path(slide).resolve())


def _wanted(name: str) -> bool:
    """Whether an open pool has used model ``name`` (call with ``_lock`` held)."""
    return any(name in pool._model_names for pool in _pools)


def _load_model(name: str, device: str) -> Any:
    """The loaded model ``name``, shared across pools; kept only while an open pool has asked for it."""
    from wsi_llava.model import load_model

    with _load_lock:
        with _lock:
            loaded = _models.get(name)
        if loaded is None:
            loaded = load_model(name, device=device)
            with _lock:
                if _wanted(name):
                    _models[name] = loaded
        return loaded


class SessionPool:
    """The sessions of one widget, by (slide, model, µm/px); :meth:`close` ends them all."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str, float | None], _Entry] = {}
        self._model_names: set[str] = set()
        self._epochs: dict[
            str, int
        ] = {}  # bumped when a slide is released: a session made meanwhile is dropped
        self._running: list[tuple[CancelToken, str]] = []
        self._create_lock = threading.Lock()
        self._closed = False
        with _lock:
            _pools.add(self)

    @property
    def closed(self) -> bool:
        return self._closed

    def slides(self) -> set[str]:
        """The resolved paths of the slides this pool holds a session for."""
        with _lock:
            return {key[0] for key in self._entries}

    def _entry(self, slide: str | Path, model: str, mpp: float | None) -> _Entry:
        from wsi_llava.session import SlideSession
        from wsi_llava.settings import resolve_device

        path = _path_key(slide)
        key = (path, model, mpp)
        with self._create_lock:
            with _lock:
                if self._closed:
                    raise Cancelled("the WSI-LLaVA widget was closed")
                entry = self._entries.get(key)
                if entry is not None:
                    return entry
                epoch = self._epochs.get(path, 0)
                self._model_names.add(model)
            device = resolve_device("auto")
            session = SlideSession(slide, _load_model(model, device), mpp=mpp, device=device)
            with _lock:
                if not self._closed and self._epochs.get(path, 0) == epoch:
                    entry = _Entry(session)
                    self._entries[key] = entry
                    return entry
            session.close()
            raise Cancelled(f"{slide} was closed while its session was being opened")

    @contextmanager
    def using(
        self, slide: str | Path, model: str, mpp: float | None, cancel: CancelToken | None = None
    ) -> Iterator[Any]:
        """The session for (slide, model, µm/px), created on first use and held for this block.

        ``cancel`` is cancelled when the slide is released or the pool closes during the block.
        """
        path = _path_key(slide)
        token = cancel or CancelToken()
        with _lock:
            self._running.append((token, path))
        try:
            entry = self._entry(slide, model, mpp)
            try:
                with entry.lock:
                    if entry.closed:
                        raise Cancelled(f"{slide} was closed")
                    yield entry.session
            finally:
                entry.close_if_retired()
        finally:
            with _lock:
                self._running.remove((token, path))

    def release_slide(self, slide: str | Path) -> None:
        """Close the sessions of ``slide`` (its layer is gone); a running question on it is cancelled."""
        path = _path_key(slide)
        with _lock:
            self._epochs[path] = self._epochs.get(path, 0) + 1
            entries = [self._entries.pop(k) for k in [k for k in self._entries if k[0] == path]]
            running = [token for token, p in self._running if p == path]
        _stop(running, entries)

    def close(self) -> None:
        """Close every session of the pool and drop the models no other open pool uses."""
        with _lock:
            if self._closed:
                return
            self._closed = True
            _pools.discard(self)
            entries = list(self._entries.values())
            self._entries.clear()
            running = [token for token, _ in self._running]
            for name in self._model_names:
                if not _wanted(name):
                    _models.pop(name, None)
        _stop(running, entries)
        logger.debug("closed %d WSI-LLaVA session(s)", len(entries))


def forget_model(name: str) -> None:
    """Drop the loaded model ``name`` and its sessions, so a re-registered model of that name is reloaded.

    A session whose question is still running is closed when that question ends.
    """
    with _lock:
        _models.pop(name, None)
        entries = []
        for pool in _pools:
            for key in [k for k in pool._entries if k[1] == name]:
                entries.append(pool._entries.pop(key))
    _stop([], entries)


def _stop(running: list[CancelToken], entries: list[_Entry]) -> None:
    """Cancel the questions still running, then close the sessions (now, or when those let go)."""
    for token in running:
        token.cancel()
    for entry in entries:
        entry.retire()


def ask_events(
    pool: SessionPool,
    slide: str,
    model: str,
    mpp: float | None,
    jobs: list[Job],
    cancel: CancelToken,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    evidence: bool = True,
) -> Iterator[tuple]:
    """Yield ``("status"|"progress"|"start"|"token"|"answer"|"tick"|"error", ...)`` events for the
    questions ``jobs`` about ``slide``, answered by a session of ``pool``.

    Errors of the user's input (``WsiLlavaError``, ``Cancelled`` included) come as an ``("error", e)``
    event; closing the generator (``worker.quit()``) cancels the work.
    """

    def answer_all(emit: Callable[[tuple], None]) -> None:
        emit(("status", f"loading model {model!r} and opening the slide…"))
        with pool.using(slide, model, mpp, cancel) as session:
            cancel.raise_if_cancelled()
            emit(("status", "tile features…"))
            session.extract(progress=lambda d, t, m: emit(("progress", d, t, m)), cancel=cancel)
            for i, job in enumerate(jobs):
                cancel.raise_if_cancelled()
                emit(("start", i, job))
                for chunk in session.ask_stream(
                    job.question,
                    job.region,
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    evidence=evidence,
                    cancel=cancel,
                ):
                    emit(("token", i, chunk))
                cancel.raise_if_cancelled()  # generation stops quietly on cancel: keep no partial answer
                emit(("answer", i, session.last_answer, session.reader.dimensions))

    yield from pump_events(answer_all, cancel)  # a generator function: napari makes a GeneratorWorker


def pump_events(
    work: Callable[[Callable[[tuple], None]], None],
    cancel: CancelToken,
    on_cancel: Callable[[], None] | None = None,
) -> Iterator[tuple]:
    """Run ``work(emit)`` in a helper thread and yield what it emits, a ``("tick",)`` every ``POLL`` s.

    A ``WsiLlavaError`` (``Cancelled`` included) ends the stream as an ``("error", e)`` event; closing the
    generator (``worker.quit()``) cancels ``cancel`` and calls ``on_cancel`` (e.g. to close a connection).
    """
    from wsi_llava.errors import WsiLlavaError

    events: queue.SimpleQueue[tuple] = queue.SimpleQueue()

    def target() -> None:
        try:
            work(events.put)
            events.put(("_done",))
        except BaseException as e:  # handed to the generator, which raises or reports it
            events.put(("_raise", e))

    thread = threading.Thread(target=target, name="wsi-llava-ask", daemon=True)
    thread.start()
    try:
        while True:
            try:
                event = events.get(timeout=POLL)
            except queue.Empty:
                yield ("tick",)
                continue
            if event[0] == "_done":
                return
            if event[0] == "_raise":
                if isinstance(event[1], WsiLlavaError):
                    yield ("error", event[1])
                    return
                raise event[1]
            yield event
    finally:
        if thread.is_alive():
            cancel.cancel()
            if on_cancel is not None:
                on_cancel()
