"""Scale-out of ``wsi-llava serve``: one model worker process per GPU behind the one API process.

:class:`WorkerPool` is an :class:`~wsi_llava.serve.engine.Engine` whose model work runs elsewhere: the API
process keeps admission (429/503, drain), uploads and ``slide_path`` confinement (Engine's own code), and
forwards ``extract``, ``ask`` and ``describe`` to the worker that holds the slide's features. Each worker is
a ``spawn``-ed process running a plain in-process ``Engine`` on its device. A slide is routed by
rendezvous (highest-random-weight) hashing over the live workers, so routing is stable and a worker that
dies moves only its own slides. Requests and replies cross a ``multiprocessing`` pipe as pydantic JSON;
events stream back as they happen, and a cancelled request is cancelled in its worker too. A worker that
dies fails only the requests it had in hand and is started again after a pause that doubles with each death
soon after a start (and given up on after a few); its slides go to the others meanwhile and come back after.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from wsi_llava import errors
from wsi_llava.answer import Answer
from wsi_llava.errors import Cancelled, WsiLlavaError
from wsi_llava.progress import ProgressCallback
from wsi_llava.serve.config import ServeConfig
from wsi_llava.serve.engine import Emit, Engine, ModelSlot, Ticket
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
    WorkerInfo,
)
from wsi_llava.serve.security import ApiError

logger = logging.getLogger(__name__)

#: the stream events a worker sends, by name
EVENT_MODELS: dict[str, type[BaseModel]] = {
    "progress": Progress,
    "token": TokenEvent,
    "result": RegionOutcome,
}
#: how often (s) a worker reports its counts when they changed, and the API polls a ticket for cancels
_TICK = 0.1
#: how long (s) a cancelled request waits for its worker to confirm before its API thread gives up on it
_CANCEL_GRACE = 30.0
#: the pause (s) before a dead worker is started again, doubled for each try since it last ran a while
_RESTART_PAUSE = 1.0
#: tries to start a dead worker again, counted since it last ran for :data:`_STABLE` s, before giving up
_RESTART_TRIES = 5
#: seconds a worker must have run for its next death to start the count of tries afresh
_STABLE = 60.0


def parse_devices(devices: str | None, workers: int | None, device: str) -> list[str] | None:
    """The worker devices ``--devices`` (comma-separated) or ``--workers N`` name; None for one engine.

    ``--workers N`` means ``cuda:0`` .. ``cuda:N-1`` on CUDA and N worker processes on the CPU.
    """
    if devices is not None and workers is not None:
        raise WsiLlavaError("give --devices or --workers, not both")
    if devices is not None:
        out = [d.strip() for d in devices.split(",") if d.strip()]
        if not out:
            raise WsiLlavaError(f"--devices {devices!r}: name at least one device (e.g. cuda:0,cuda:1)")
        if len(set(out)) != len(out):
            raise WsiLlavaError(f"--devices {devices!r}: a device is named twice")
        return out
    if workers is None:
        return None
    if workers < 1:
        raise WsiLlavaError(f"--workers {workers}: give 1 or more")
    from wsi_llava.settings import resolve_device

    resolved = resolve_device(device)
    if resolved.startswith("cuda"):
        return [f"cuda:{i}" for i in range(workers)]
    return [resolved] * workers


def make_engine(config: ServeConfig, devices: list[str] | None) -> Engine:
    """A plain in-process :class:`Engine` for one device, a :class:`WorkerPool` for several."""
    if not devices:
        return Engine(config)
    if len(devices) == 1:
        return Engine(config.model_copy(update={"device": devices[0]}))
    return WorkerPool(config, devices)


def rendezvous(key: str, workers: list[str]) -> int:
    """The index in ``workers`` (their stable names) that ``key`` goes to: the highest hash of the pair wins."""
    if not workers:
        raise ValueError("no workers to route to")

    def weight(i: int) -> bytes:
        return hashlib.sha256(f"{workers[i]}\0{key}".encode()).digest()

    return max(range(len(workers)), key=weight)


# --- the API side -----------------------------------------------------------------------------------
@dataclass
class _Worker:
    """One worker process as the API process sees it: its pipe, requests in hand and last reported counts."""

    index: int
    device: str
    process: Any = None
    conn: Any = None
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    pending: dict[int, queue.Queue] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    alive: bool = False
    ready: threading.Event = field(default_factory=threading.Event)
    failure: str | None = None
    pid: int | None = None
    infos: list[ModelInfo] = field(default_factory=list)
    routed: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    reader: threading.Thread | None = None
    state: str = "starting"
    restarts: int = 0
    tries: int = 0
    started: float = 0.0
    past_extractions: int = 0

    @property
    def name(self) -> str:
        """The worker's name in routing: its position and device (stable across restarts of the server)."""
        return f"{self.index}:{self.device}"

    def label(self) -> str:
        return f"model worker {self.index} ({self.device}, pid {self.pid})"

    def send(self, message: tuple) -> None:
        with self.send_lock:
            self.conn.send(message)


class WorkerPool(Engine):
    """An :class:`Engine` whose models live in one worker process per device; the app uses it as an Engine."""

    def __init__(self, config: ServeConfig, devices: list[str]) -> None:
        super().__init__(config)
        if not devices:
            raise WsiLlavaError("a worker pool needs at least one device")
        self.devices = list(devices)
        self.workers = [_Worker(i, d) for i, d in enumerate(self.devices)]
        self._ids = itertools.count(1)
        self.device = ",".join(self.devices)
        self._closed = False
        self._stopping = threading.Event()
        self._life = threading.Lock()  # starting a worker and closing the pool exclude each other
        self._restarters: list[threading.Thread] = []
        n_cpu = sum(1 for d in self.devices if not d.startswith("cuda"))
        self._threads = max(1, (os.cpu_count() or 1) // n_cpu) if n_cpu > 1 else 0

    # --- lifecycle ---------------------------------------------------------------------------
    def load(self) -> None:
        """Start every worker (each loads every ``--model`` on its device); a worker that fails fails start-up."""
        with self._life:
            for w in self.workers:
                self._spawn(w)
        for w in self.workers:
            w.ready.wait()
            if w.failure is not None:
                self.close()
                raise WsiLlavaError(w.failure)
        self.slots = {name: ModelSlot(name, None, None) for name in self.config.models}
        logger.info("%d model workers ready on %s", len(self.workers), ", ".join(self.devices))

    def _spawn(self, w: _Worker) -> None:
        """Start ``w``'s process and the thread reading its pipe (under ``self._life``)."""
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        threads = self._threads if not w.device.startswith("cuda") else 0
        process = ctx.Process(
            target=worker_main,
            args=(child, self.config.model_dump_json(), w.index, w.device, threads),
            name=f"wsi-llava-worker-{w.index}",
            daemon=False,
        )
        w.ready, w.failure, w.state, w.started = threading.Event(), None, "starting", time.monotonic()
        process.start()
        child.close()  # the child's end lives in the child only: its death closes the pipe here
        w.process, w.conn, w.pid = process, parent, process.pid
        w.reader = threading.Thread(
            target=self._read, args=(w, parent, process), name=f"worker-{w.index}-reader", daemon=True
        )
        w.reader.start()

    def _reap(self, w: _Worker) -> None:
        """Stop ``w``'s process (asked by then, or dead: terminated, then killed) and free its pipe."""
        process = w.process
        if process is None:
            return
        process.join(30)
        if process.is_alive():
            logger.warning("%s: did not stop when asked; terminating it", w.label())
            process.terminate()
            process.join(10)
        if process.is_alive():
            process.kill()
            process.join()
        if w.reader is not None and w.reader is not threading.current_thread():
            w.reader.join(5)
        with contextlib.suppress(OSError):
            w.conn.close()
        process.close()
        w.process = None

    def close(self) -> None:
        """Stop every worker process (asked first, then terminated, then killed); none is left running."""
        with self._life:
            if self._closed:
                return
            self._closed = True
        self._stopping.set()  # no worker is started from now on; one loading now is asked to close too
        for w in self.workers:
            if w.process is not None and w.process.is_alive():
                with contextlib.suppress(OSError, ValueError):
                    w.send(("close",))
        for w in self.workers:
            self._reap(w)
            w.state = "stopped"
        for t in self._restarters:
            t.join(5)

    def _restart(self, w: _Worker) -> None:
        """Start dead ``w`` again after a pause, doubling the pause for each try since it last ran a while;
        give up after :data:`_RESTART_TRIES` tries (logged), its slides staying with the other workers."""
        while True:
            if w.tries >= _RESTART_TRIES:
                w.state = "stopped"
                logger.error(
                    "model worker %d (%s): not started again after %d tries; its slides stay with the "
                    "workers left",
                    w.index,
                    w.device,
                    w.tries,
                )
                return
            pause = _RESTART_PAUSE * 2**w.tries
            w.tries += 1
            logger.warning(
                "model worker %d (%s): starting it again in %g s (try %d of %d)",
                w.index,
                w.device,
                pause,
                w.tries,
                _RESTART_TRIES,
            )
            if self._stopping.wait(pause):
                return
            with self._life:
                if self._closed or self.draining:
                    return
                self._reap(w)
                self._spawn(w)
            w.ready.wait()
            if w.alive:
                w.restarts += 1
                logger.warning("%s started again (restart %d)", w.label(), w.restarts)
                return
            logger.error("model worker %d (%s) did not start again: %s", w.index, w.device, w.failure)
            w.state = "restarting"

    # --- models and counts -------------------------------------------------------------------
    @property
    def worker_count(self) -> int:
        """Live model worker processes."""
        return sum(1 for w in self.workers if w.alive)

    def live(self) -> list[_Worker]:
        return [w for w in self.workers if w.alive]

    def model_infos(self) -> list[ModelInfo]:
        for w in self.workers:
            if w.infos:
                return list(w.infos)
        return super().model_infos()

    def queue_state(self) -> QueueState:
        with self._lock:
            inflight = len(self._inflight)
        live = self.live()
        running = min(inflight, sum(w.counts.get("running", 0) for w in live))
        return QueueState(
            running=running,
            queued=max(0, inflight - running),
            capacity=self.config.queue,
            extractions=sum(w.past_extractions + w.counts.get("extractions", 0) for w in self.workers),
            workers_detail=[self.worker_info(w) for w in self.workers],
        )

    def worker_info(self, w: _Worker) -> WorkerInfo:
        with w.lock:
            in_hand = len(w.pending)
        return WorkerInfo(
            index=w.index,
            device=w.device,
            pid=w.pid,
            alive=w.alive,
            state=w.state,  # type: ignore[arg-type]
            restarts=w.restarts,
            routed=w.routed,
            in_hand=in_hand,
            running=w.counts.get("running", 0),
            extractions=w.counts.get("extractions", 0),
            cancelled=w.counts.get("cancelled", 0),
        )

    # --- routing -----------------------------------------------------------------------------
    def route_key(self, slide: str, path: Path) -> str:
        """What a slide is routed by: its resolved path under the slides root, an upload by its sha256."""
        if slide.startswith(UPLOAD_PREFIX):
            return UPLOAD_PREFIX + path.name.split(".", 1)[0]
        root = self.config.slides_root.resolve()
        return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)

    def route(self, slide: str) -> _Worker:
        """The live worker that holds (or will hold) ``slide``'s features."""
        key = self.route_key(slide, self.slide_path(slide))
        live = self.live()
        if not live:
            if any(w.state in ("starting", "restarting") for w in self.workers):
                raise ApiError(
                    429,
                    "busy",
                    "no model worker is running now; they are being started again, try again shortly",
                    headers={"Retry-After": "5"},
                )
            raise ApiError(
                500, "internal", "no model worker is running; the server log says why they stopped"
            )
        return live[rendezvous(key, [w.name for w in live])]

    # --- model work, forwarded ---------------------------------------------------------------
    def extract(self, slide: str, model: str | None, ticket: Ticket, progress: ProgressCallback) -> None:
        slot = self.slot(model)

        def emit(event: str, data: Any) -> None:
            if event == "progress":
                progress(data.done, data.total, data.message)

        self._call(slide, "extract", json.dumps({"slide": slide, "model": slot.name}), ticket, emit)

    def ask(self, req: AskRequest, ticket: Ticket, emit: Emit) -> Answer:
        self.slot(req.model)
        out = self._call(req.slide, "ask", req.model_dump_json(), ticket, emit)
        return Answer.model_validate_json(out)

    def describe(self, req: DescribeRequest, ticket: Ticket, emit: Emit | None) -> DescribeResult:
        self.slot(req.model)
        out = self._call(req.slide, "describe", req.model_dump_json(), ticket, emit)
        return DescribeResult.model_validate_json(out)

    def _call(self, slide: str, kind: str, payload: str, ticket: Ticket, emit: Emit | None) -> Any:
        """Send one request to ``slide``'s worker and wait for its answer, passing events and cancels on."""
        rid = next(self._ids)
        replies: queue.Queue = queue.Queue()
        while True:  # a worker found dead before it got the request: route again
            worker = self.route(slide)
            with worker.lock:
                if not worker.alive:
                    continue
                worker.pending[rid] = replies
                worker.routed += 1
            try:
                worker.send(("run", rid, kind, payload))
                break
            except (OSError, ValueError):
                with worker.lock:
                    worker.pending.pop(rid, None)
                self._died(worker, worker.process)
        cancel_sent: float | None = None
        try:
            while True:
                if ticket.cancelled and cancel_sent is None:
                    cancel_sent = time.monotonic()
                    with contextlib.suppress(OSError, ValueError):  # a dead worker: its reader fails it
                        worker.send(("cancel", rid, ticket.reason or "cancelled"))
                try:
                    msg = replies.get(timeout=_TICK)
                except queue.Empty:
                    if cancel_sent is not None and time.monotonic() - cancel_sent > _CANCEL_GRACE:
                        logger.warning(
                            "%s: request %d not stopped %g s after its cancel",
                            worker.label(),
                            rid,
                            _CANCEL_GRACE,
                        )
                        raise Cancelled("cancelled") from None
                    continue
                tag = msg[0]
                if tag == "event":
                    _, name, data = msg
                    if emit is not None and name in EVENT_MODELS:
                        emit(name, EVENT_MODELS[name].model_validate_json(data))
                elif tag == "done":
                    return msg[1]
                elif tag == "error":
                    raise _error_from(msg[1])
        finally:
            with worker.lock:
                worker.pending.pop(rid, None)

    # --- the reader thread of one worker ----------------------------------------------------
    def _read(self, w: _Worker, conn: Any, process: Any) -> None:
        """Pass the replies of ``w``'s ``process`` to the requests waiting on them until its pipe closes."""
        while True:
            try:
                if not conn.poll(0.5):
                    if process.is_alive():
                        continue
                    if conn.poll(0):  # last words before it went
                        msg = conn.recv()
                    else:
                        break
                else:
                    msg = conn.recv()
            except (EOFError, OSError, ValueError):
                break
            tag = msg[0]
            if tag == "ready":
                _, w.pid, infos = msg
                w.infos = [ModelInfo.model_validate_json(i) for i in infos]
                w.alive, w.state = True, "running"
                w.ready.set()
            elif tag == "failed":
                w.failure = msg[1]
                w.ready.set()
            elif tag == "state":
                w.counts = json.loads(msg[1])
            elif tag in ("event", "done", "error"):
                rid = msg[1]
                with w.lock:
                    replies = w.pending.get(rid)
                if replies is not None:
                    replies.put((tag, *msg[2:]))
        self._died(w, process)

    def _died(self, w: _Worker, process: Any) -> None:
        """``w``'s ``process`` ended: fail its requests in hand with a 500 naming it; routing skips it until
        it is started again (:meth:`_restart`)."""
        with w.lock:
            if process is not w.process:  # an earlier life of the worker, already dealt with
                return
            was_alive, w.alive = w.alive, False
            pending = list(w.pending.values())
            w.pending.clear()
        if not w.ready.is_set():
            code = _exit_code(process)
            w.failure = (
                w.failure or f"model worker {w.index} ({w.device}) ended while loading (exit code {code})"
            )
            w.ready.set()
        if was_alive and not self._closed:
            code = _exit_code(process)
            w.past_extractions += w.counts.get("extractions", 0)
            w.counts = {}
            logger.error(
                "%s stopped (exit code %s): %d request(s) failed; %d worker(s) left",
                w.label(),
                code,
                len(pending),
                self.worker_count,
            )
            if time.monotonic() - w.started >= _STABLE:
                w.tries = 0
            if not self.draining:
                w.state = "restarting"
                with self._life:
                    if not self._closed:
                        t = threading.Thread(
                            target=self._restart, args=(w,), name=f"worker-{w.index}-restart", daemon=True
                        )
                        self._restarters.append(t)
                        t.start()
            else:
                w.state = "stopped"
        message = (
            f"{w.label()} stopped while working on this request; retry: it is started again, and its slides "
            "go to the other workers meanwhile"
        )
        for replies in pending:
            replies.put(("error", {"kind": "api", "status": 500, "code": "internal", "message": message}))


def _exit_code(process: Any) -> int | None:
    """The exit code of a worker process that ended (None if it has not, or was already closed)."""
    try:
        process.join(1)
        return process.exitcode
    except ValueError:
        return None


def _error_from(err: dict[str, Any]) -> BaseException:
    """The exception a worker's error reply stands for, of the type the worker raised where it matters."""
    kind = err.get("kind")
    if kind == "cancelled":
        return Cancelled(err.get("message") or "cancelled")
    if kind == "user":
        cls = getattr(errors, err.get("type", ""), None)
        if not (isinstance(cls, type) and issubclass(cls, WsiLlavaError)):
            cls = WsiLlavaError
        return cls(err.get("message", ""))
    return ApiError(
        int(err.get("status", 500)),
        err.get("code", "internal"),
        err.get("message", "internal error; the server log has the details"),
        headers=err.get("headers") or None,
    )


# --- the worker side --------------------------------------------------------------------------------
def worker_main(conn: Any, config_json: str, index: int, device: str, threads: int) -> None:
    """A worker process: load an :class:`Engine` on ``device``, then run the requests its pipe brings."""
    # the API process drains on SIGTERM / Ctrl-C (sent to the whole process group) and then stops us
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from wsi_llava.serve.command import quiet_progress_bars

    quiet_progress_bars()
    config = ServeConfig.model_validate_json(config_json).model_copy(update={"device": device})
    _worker_logging(config.log_level, index, device)
    send_lock = threading.Lock()

    def send(message: tuple) -> None:
        with send_lock:
            conn.send(message)

    engine = Engine(config)
    try:
        if threads:
            import torch

            torch.set_num_threads(threads)
        if device.startswith("cuda:"):
            import torch

            torch.cuda.set_device(device)
        engine.load()
    except BaseException as e:
        logger.error("model worker %d (%s): could not load the models", index, device, exc_info=True)
        message = str(e) if isinstance(e, WsiLlavaError) else f"{type(e).__name__}: {e}"
        send(("failed", f"model worker {index} ({device}): {message}"))
        engine.close()
        conn.close()
        return
    send(("ready", os.getpid(), [i.model_dump_json() for i in engine.model_infos()]))
    worker = _WorkerLoop(engine, send)
    try:
        worker.serve(conn)
    finally:
        worker.stop()
        engine.close()
        conn.close()


def _worker_logging(level: str, index: int, device: str) -> None:
    root = logging.getLogger("wsi_llava")
    root.setLevel(getattr(logging, level.upper(), logging.WARNING))
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"%(levelname)s worker {index} ({device}) %(name)s: %(message)s"))
    root.addHandler(handler)
    root.propagate = False


class _WorkerLoop:
    """The requests of one worker process: each runs in a thread on the engine; counts go to the API."""

    def __init__(self, engine: Engine, send: Callable[[tuple], None]) -> None:
        self.engine = engine
        self.send = send
        self.tickets: dict[int, Ticket] = {}
        self.lock = threading.Lock()
        self.report_lock = threading.Lock()
        self.cancelled = 0
        self.pool = ThreadPoolExecutor(max_workers=engine.capacity + 2, thread_name_prefix="worker-request")
        self.stopping = threading.Event()
        self._last: str | None = None
        self.reporter = threading.Thread(target=self._report_loop, name="worker-report", daemon=True)
        self.reporter.start()

    def serve(self, conn: Any) -> None:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):  # the API process is gone
                return
            tag = msg[0]
            if tag == "run":
                _, rid, kind, payload = msg
                ticket = Ticket()
                with self.lock:
                    self.tickets[rid] = ticket
                self.pool.submit(self._run, rid, kind, payload, ticket)
            elif tag == "cancel":
                _, rid, reason = msg
                with self.lock:
                    ticket = self.tickets.get(rid)
                if ticket is not None:
                    ticket.cancel(reason)
            elif tag == "close":
                return

    def stop(self) -> None:
        with self.lock:
            left = list(self.tickets.values())
        for t in left:
            t.cancel("draining")
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.stopping.set()
        self.reporter.join(2)

    def _run(self, rid: int, kind: str, payload: str, ticket: Ticket) -> None:
        from wsi_llava.serve.app import error_of

        def emit(event: str, data: Any) -> None:
            self.send(("event", rid, event, data.model_dump_json()))

        try:
            self.engine.admit(ticket)
            try:
                if kind == "ask":
                    out: str | None = self.engine.ask(AskRequest.model_validate_json(payload), ticket, emit)
                    out = out.model_dump_json()
                elif kind == "describe":
                    result = self.engine.describe(DescribeRequest.model_validate_json(payload), ticket, emit)
                    out = result.model_dump_json()
                elif kind == "extract":
                    args = json.loads(payload)

                    def progress(done: int, total: int, message: str) -> None:
                        emit("progress", Progress(done=done, total=total, message=message))

                    self.engine.extract(args["slide"], args["model"], ticket, progress)
                    out = None
                else:
                    raise ApiError(400, "bad_request", f"unknown request kind {kind!r}")
            finally:
                self.engine.release(ticket)
            reply: tuple = ("done", rid, out)
        except Cancelled as e:
            with self.lock:
                self.cancelled += 1
            logger.info("request %d cancelled (%s)", rid, ticket.reason)
            reply = ("error", rid, {"kind": "cancelled", "message": str(e) or "cancelled"})
        except WsiLlavaError as e:
            reply = ("error", rid, {"kind": "user", "type": type(e).__name__, "message": str(e)})
        except BaseException as exc:  # ApiError as it is; a bug logged here, a 500 without a trace there
            e = error_of(exc, ticket)
            reply = (
                "error",
                rid,
                {
                    "kind": "api",
                    "status": e.status,
                    "code": e.code,
                    "message": e.message,
                    "headers": e.headers,
                },
            )
        finally:
            with self.lock:
                self.tickets.pop(rid, None)
        self._report()  # the counts first, so the API sees them when the reply arrives
        with contextlib.suppress(OSError, ValueError):
            self.send(reply)

    def counts(self) -> str:
        q = self.engine.queue_state()
        with self.lock:
            cancelled = self.cancelled
        return json.dumps({"running": q.running, "extractions": q.extractions, "cancelled": cancelled})

    def _report(self) -> None:
        with self.report_lock:  # one at a time, so a later count never arrives before an earlier one
            state = self.counts()
            if state == self._last:
                return
            self._last = state
            with contextlib.suppress(OSError, ValueError):
                self.send(("state", state))

    def _report_loop(self) -> None:
        while not self.stopping.wait(_TICK):
            self._report()
