"""Background jobs (``POST /v1/extract``): run in a thread, watched by id, cancelled by ``DELETE``."""

from __future__ import annotations

import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from wsi_llava.errors import Cancelled, WsiLlavaError
from wsi_llava.serve.engine import Ticket
from wsi_llava.serve.schemas import ErrorDetail, Job, Progress
from wsi_llava.serve.security import ApiError

logger = logging.getLogger(__name__)

#: finished jobs kept for GET (the oldest finished ones are forgotten first)
KEEP_JOBS = 256


class JobRecord:
    """A job's state, its progress events so far (for ``/events``), and its ticket."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.ticket = Ticket()
        self.events: list[tuple[str, Any]] = []
        self.cond = threading.Condition()

    def push(self, event: str, data: Any) -> None:
        with self.cond:
            self.events.append((event, data))
            self.cond.notify_all()

    @property
    def finished(self) -> bool:
        return self.job.state in ("done", "failed", "cancelled")


class JobStore:
    """Jobs by id; each runs ``work(ticket, progress)`` in its own thread."""

    def __init__(self) -> None:
        self._jobs: OrderedDict[str, JobRecord] = OrderedDict()
        self._lock = threading.Lock()

    def start(
        self,
        kind: str,
        slide: str,
        model: str,
        work: Callable[[Ticket, Callable[[int, int, str], None]], Any],
        on_end: Callable[[Ticket], None] | None = None,
        ticket: Ticket | None = None,
    ) -> JobRecord:
        rec = JobRecord(Job(id=uuid.uuid4().hex, kind=kind, state="queued", slide=slide, model=model))
        if ticket is not None:
            rec.ticket = ticket
        with self._lock:
            self._jobs[rec.job.id] = rec
            self._forget_old()

        def progress(done: int, total: int, message: str) -> None:
            p = Progress(done=done, total=total, message=message)
            rec.job = rec.job.model_copy(update={"progress": p, "state": "running"})
            rec.push("progress", p)

        def run() -> None:
            rec.job = rec.job.model_copy(update={"state": "running"})
            update: dict[str, Any]
            try:
                work(rec.ticket, progress)
                update = {"state": "done"}
            except Cancelled:
                update = {"state": "cancelled", "error": _detail("cancelled", "the job was cancelled")}
                if rec.ticket.reason == "draining":
                    update["error"] = _detail("draining", "the server is shutting down")
            except ApiError as e:
                update = {"state": "failed", "error": _detail(e.code, e.message)}
            except WsiLlavaError as e:
                update = {"state": "failed", "error": _detail("bad_request", str(e))}
            except Exception:
                logger.exception("job %s failed", rec.job.id)
                update = {
                    "state": "failed",
                    "error": _detail("internal", "internal error; see the server log"),
                }
            finally:
                if on_end is not None:
                    on_end(rec.ticket)
            rec.job = rec.job.model_copy(update=update)
            rec.push("job", rec.job)

        threading.Thread(target=run, name=f"job-{rec.job.id[:8]}", daemon=True).start()
        return rec

    def get(self, job_id: str) -> JobRecord:
        with self._lock:
            rec = self._jobs.get(job_id)
        if rec is None:
            raise ApiError(404, "not_found", f"job {job_id!r}: no such job on this server")
        return rec

    def cancel(self, job_id: str) -> JobRecord:
        rec = self.get(job_id)
        if not rec.finished:
            rec.ticket.cancel("cancelled")
        return rec

    def _forget_old(self) -> None:
        done = [k for k, r in self._jobs.items() if r.finished]
        for k in done[: max(0, len(self._jobs) - KEEP_JOBS)]:
            del self._jobs[k]


def _detail(code: str, message: str) -> ErrorDetail:
    return ErrorDetail(code=code, message=message)  # type: ignore[arg-type]
