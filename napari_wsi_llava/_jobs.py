"""Background work of the widget: shared sessions and a generator of events for napari thread workers.

The core's calls (model load, feature extraction, streamed answers) run in a helper thread and post
events to a queue; :func:`ask_events` yields them, so a napari ``GeneratorWorker`` streams tokens and
progress and ``worker.quit()`` takes effect within ``POLL`` seconds even during a long forward pass.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsi_llava.progress import CancelToken
from wsi_llava.slide.region import Region

logger = logging.getLogger(__name__)

POLL = 0.1

_lock = threading.Lock()
_models: dict[str, Any] = {}
_sessions: dict[tuple[str, str, float | None], Any] = {}
_session_locks: dict[tuple[str, str, float | None], threading.Lock] = {}


def block_triton_after_gl() -> None:
    """Make ``import triton`` fail cleanly (torch then runs without it) unless it is already loaded.

    triton ships its own LLVM; loading it after Mesa's LLVM (napari's OpenGL context is already up when
    the plugin loads) segfaults the process. napari never needs torch.compile, so inference is unaffected.
    ``WSI_LLAVA_NAPARI_ALLOW_TRITON=1`` turns the guard off.
    """
    if os.environ.get("WSI_LLAVA_NAPARI_ALLOW_TRITON") == "1" or "triton" in sys.modules:
        return
    sys.modules["triton"] = None  # type: ignore[assignment]
    logger.debug("napari: blocked 'import triton' (its LLVM clashes with Mesa's once OpenGL is up)")


@dataclass
class Job:
    """One question: about the whole slide (``region`` None) or a shape of a Shapes layer."""

    question: str
    region: Region | None = None
    shape_index: int | None = None
    target: str = "answer"  # or "description"
    title: str = "whole slide"


def get_session(slide: str | Path, model: str, mpp: float | None = None) -> tuple[Any, threading.Lock]:
    """The ``SlideSession`` for (slide, model, µm/px), created once per process; models are shared."""
    from wsi_llava.model import load_model
    from wsi_llava.session import SlideSession
    from wsi_llava.settings import resolve_device

    key = (str(Path(slide).resolve()), model, mpp)
    with _lock:
        session = _sessions.get(key)
        if session is None:
            device = resolve_device("auto")
            loaded = _models.get(model)
            if loaded is None:
                loaded = load_model(model, device=device)
                _models[model] = loaded
            session = SlideSession(slide, loaded, mpp=mpp, device=device)
            _sessions[key] = session
            _session_locks[key] = threading.Lock()
        return session, _session_locks[key]


def clear_sessions() -> None:
    """Close every cached session and forget loaded models (frees memory)."""
    with _lock:
        for s in _sessions.values():
            s.close()
        _sessions.clear()
        _session_locks.clear()
        _models.clear()


def forget_model(name: str) -> None:
    """Drop the loaded model ``name`` and its sessions, so a re-registered model of that name is reloaded.

    A session whose question is still running is left to finish (it is only forgotten, not closed).
    """
    with _lock:
        _models.pop(name, None)
        for key in [k for k in _sessions if k[1] == name]:
            session, session_lock = _sessions.pop(key), _session_locks.pop(key)
            if session_lock.acquire(blocking=False):
                try:
                    session.close()
                finally:
                    session_lock.release()


def _ask_body(
    emit: Callable[[tuple], None],
    slide: str,
    model: str,
    mpp: float | None,
    jobs: list[Job],
    cancel: CancelToken,
    max_new_tokens: int | None,
    temperature: float | None,
    evidence: bool,
) -> None:
    emit(("status", f"loading model {model!r} and opening the slide…"))
    session, session_lock = get_session(slide, model, mpp)
    with session_lock:
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


def ask_events(
    slide: str,
    model: str,
    mpp: float | None,
    jobs: list[Job],
    cancel: CancelToken,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    evidence: bool = True,
) -> Iterator[tuple]:
    """Yield ``("status"|"progress"|"start"|"token"|"answer"|"tick"|"error", ...)`` events.

    Errors of the user's input (``WsiLlavaError``, ``Cancelled`` included) come as an ``("error", e)``
    event; closing the generator (``worker.quit()``) cancels the work.
    """
    from wsi_llava.errors import WsiLlavaError

    events: queue.SimpleQueue[tuple] = queue.SimpleQueue()

    def target() -> None:
        try:
            _ask_body(events.put, slide, model, mpp, jobs, cancel, max_new_tokens, temperature, evidence)
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
