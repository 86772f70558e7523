"""The ``/v1`` HTTP API of ``wsi-llava serve`` (FastAPI): routes, streams, limits and error replies.

Blocking model work runs in worker threads (:class:`~wsi_llava.serve.engine.Engine`); a stream's events
reach the client through an asyncio queue. A client that goes away cancels its request, which frees its
decode slot. Every reply carries ``X-WSI-LLaVA-Version``; every error reply is an ``ErrorBody``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from wsi_llava import __version__
from wsi_llava.answer import Answer
from wsi_llava.errors import Cancelled, WsiLlavaError
from wsi_llava.serve.config import ServeConfig
from wsi_llava.serve.engine import Engine, Ticket
from wsi_llava.serve.jobs import JobStore
from wsi_llava.serve.schemas import (
    API_VERSION,
    VERSION_HEADER,
    AskRequest,
    DescribeRequest,
    DescribeResult,
    ErrorBody,
    ErrorDetail,
    ExtractRequest,
    Health,
    Job,
    ModelList,
    SlideRef,
)
from wsi_llava.serve.security import ApiError, check_bearer, read_token

logger = logging.getLogger(__name__)

PREFIX = f"/{API_VERSION}"
SSE = "text/event-stream"
#: the events that end a stream
FINAL_EVENTS = ("answer", "describe", "job", "error")
_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "invalid",
    413: "too_large",
    422: "invalid",
    429: "busy",
    503: "draining",
    504: "timeout",
}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(code=code, message=message))  # type: ignore[arg-type]
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def error_of(exc: BaseException, ticket: Ticket | None = None) -> ApiError:
    """The error reply an exception from request work becomes (never a trace: bugs are logged here)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, Cancelled):
        reason = ticket.reason if ticket is not None else None
        if reason == "timeout":
            return ApiError(504, "timeout", "the request ran past the server's per-request limit (--timeout)")
        if reason == "draining":
            return ApiError(503, "draining", "the server is shutting down; the answer was not finished")
        return ApiError(409, "cancelled", str(exc) or "cancelled")
    if isinstance(exc, WsiLlavaError):
        return ApiError(400, "bad_request", str(exc))
    if isinstance(exc, ValidationError):
        return ApiError(422, "invalid", _validation_message(exc.errors()))
    logger.error("request failed", exc_info=exc)
    return ApiError(500, "internal", "internal error; the server log has the details")


def _validation_message(errors: list[Any]) -> str:
    parts = []
    for err in errors[:3]:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
        field = ".".join(loc) or "body"
        msg = err.get("msg", "invalid")
        if err.get("type") == "json_invalid":
            field, msg = "body", "not valid JSON"
        parts.append(f"{field}: {msg}")
    return "; ".join(parts) or "invalid request"


def sse(event: str, data: BaseModel | dict[str, Any]) -> bytes:
    payload = data.model_dump_json() if isinstance(data, BaseModel) else json.dumps(data)
    return f"event: {event}\ndata: {payload}\n\n".encode()


# --- ASGI middleware ---------------------------------------------------------------------------------
class _VersionHeader:
    """Adds ``X-WSI-LLaVA-Version`` to every reply."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_version(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [
                    *message["headers"],
                    (VERSION_HEADER.lower().encode(), __version__.encode()),
                ]
            await send(message)

        await self.app(scope, receive, send_with_version)


class _Gate:
    """Bearer token, drain state and the JSON body cap, before any route runs."""

    def __init__(self, app: ASGIApp, engine: Engine, token: str | None, max_body: int) -> None:
        self.app = app
        self.engine = engine
        self.token = token
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        path: str = scope["path"]
        if path.startswith(PREFIX + "/") and path != f"{PREFIX}/health":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            try:
                check_bearer(headers.get("authorization"), self.token)
                if self.engine.draining:
                    raise ApiError(503, "draining", "the server is shutting down; try another or later")
            except ApiError as e:
                return await error_response(e.status, e.code, e.message, e.headers)(scope, receive, send)
            if scope["method"] in ("POST", "PUT", "PATCH") and path != f"{PREFIX}/slides":
                length = headers.get("content-length")
                if length is not None and length.isdigit() and int(length) > self.max_body:
                    return await self._too_large(scope, receive, send)
                chunks, size = [], 0
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        return
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    if size > self.max_body:
                        return await self._too_large(scope, receive, send)
                    if not message.get("more_body", False):
                        break
                body = b"".join(chunks)
                replayed = False

                async def replay() -> Message:
                    nonlocal replayed
                    if not replayed:
                        replayed = True
                        return {"type": "http.request", "body": body, "more_body": False}
                    return await receive()

                return await self.app(scope, replay, send)
        await self.app(scope, receive, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        msg = f"request body over the server's limit of {self.max_body / 1024 / 1024:g} MB (--max-body-mb)"
        await error_response(413, "too_large", msg)(scope, receive, send)


# --- the app ---------------------------------------------------------------------------------------
def create_app(config: ServeConfig, engine: Engine) -> FastAPI:
    """The FastAPI app serving ``engine`` as ``config`` says (token, limits, CORS)."""
    token = read_token(config.token_file) if config.token_file is not None else None
    pool = ThreadPoolExecutor(max_workers=engine.capacity + 8, thread_name_prefix="wsi-llava-request")
    jobs = JobStore()
    app = FastAPI(
        title="wsi-llava serve",
        version=__version__,
        description="Questions about whole slide images for napari, QuPath and CLI users (API "
        + API_VERSION
        + ").",
    )
    app.state.engine = engine
    app.state.jobs = jobs

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid", _validation_message(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "bad_request" if exc.status_code < 500 else "internal")
        return error_response(exc.status_code, code, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        e = error_of(exc)
        return error_response(e.status, e.code, e.message, e.headers)

    async def run(request: Request, work: Callable[[Ticket, Any], Any], final: str, stream: bool) -> Response:
        """Admit, run ``work(ticket, emit)`` in a thread, and reply with its result as JSON or as a stream."""
        ticket = Ticket()
        engine.admit(ticket)
        loop = asyncio.get_running_loop()
        if not stream:
            fut = loop.run_in_executor(pool, _released(engine, ticket, lambda: work(ticket, None)))
            deadline = loop.time() + config.timeout
            try:
                while True:
                    left = deadline - loop.time()
                    if left <= 0:
                        ticket.cancel("timeout")
                        raise error_of(Cancelled("timeout"), ticket)
                    try:
                        result = await asyncio.wait_for(asyncio.shield(fut), min(left, 0.5))
                        break
                    except TimeoutError:
                        if await request.is_disconnected():
                            ticket.cancel("disconnected")
                            raise ApiError(409, "cancelled", "the client went away") from None
            except asyncio.CancelledError:
                ticket.cancel("disconnected")
                raise
            except ApiError:
                raise
            except BaseException as exc:
                raise error_of(exc, ticket) from None
            return Response(result.model_dump_json(), media_type="application/json")

        queue: asyncio.Queue[tuple[str | None, Any]] = asyncio.Queue()

        def emit(event: str | None, data: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (event, data))

        def job() -> None:
            try:
                emit(final, work(ticket, emit))
            except BaseException as exc:
                e = error_of(exc, ticket)
                emit("error", ErrorBody(error=ErrorDetail(code=e.code, message=e.message)))  # type: ignore[arg-type]
            finally:
                engine.release(ticket)
                emit(None, None)

        loop.run_in_executor(pool, job)
        return StreamingResponse(
            _events(queue, ticket, loop.time() + config.timeout),
            media_type=SSE,
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    def wants_stream(request: Request) -> bool:
        return SSE in request.headers.get("accept", "")

    # --- routes ------------------------------------------------------------------------------
    @app.get(f"{PREFIX}/health", response_model=Health)
    async def health() -> Health:
        return Health(
            status="draining" if engine.draining else "ok",
            version=__version__,
            models=engine.names,
            workers=getattr(engine, "worker_count", 1),
            auth=token is not None,
            queue=engine.queue_state(),
        )

    @app.get(f"{PREFIX}/models", response_model=ModelList)
    async def models() -> ModelList:
        return ModelList(models=engine.model_infos())

    @app.post(
        f"{PREFIX}/slides",
        response_model=SlideRef,
        openapi_extra={"requestBody": {"content": {"application/octet-stream": {}}, "required": True}},
    )
    async def upload(request: Request) -> SlideRef:
        """Store a slide sent as the raw body (``X-Filename`` names it: its extension picks the reader)."""
        length = request.headers.get("content-length")
        return await engine.uploads.store(
            request.stream(),
            request.headers.get("x-filename"),
            int(length) if length and length.isdigit() else None,
        )

    @app.post(f"{PREFIX}/extract", response_model=Job, status_code=202)
    async def extract(req: ExtractRequest) -> Job:
        slot = engine.slot(req.model)
        engine.slide_path(req.slide)  # 403 / 404 now, not in the job
        ticket = Ticket()
        engine.admit(ticket)
        rec = jobs.start(
            "extract",
            req.slide,
            slot.name,
            lambda t, progress: engine.extract(req.slide, slot.name, t, progress),
            on_end=engine.release,
            ticket=ticket,
        )
        return rec.job

    @app.get(f"{PREFIX}/jobs/{{job_id}}", response_model=Job)
    async def job(job_id: str) -> Job:
        return jobs.get(job_id).job

    @app.delete(f"{PREFIX}/jobs/{{job_id}}", response_model=Job)
    async def cancel_job(job_id: str) -> Job:
        rec = jobs.cancel(job_id)
        for _ in range(100):  # the reply says how it ended when the work stops within seconds
            if rec.finished:
                break
            await asyncio.sleep(0.05)
        return rec.job

    @app.get(f"{PREFIX}/jobs/{{job_id}}/events")
    async def job_events(job_id: str) -> StreamingResponse:
        rec = jobs.get(job_id)

        async def events() -> AsyncIterator[bytes]:
            sent = 0
            while True:
                new = rec.events[sent:]
                for event, data in new:
                    yield sse(event, data)
                    if event == "job":
                        return
                sent += len(new)
                await asyncio.sleep(0.05)

        return StreamingResponse(events(), media_type=SSE, headers={"Cache-Control": "no-store"})

    @app.post(f"{PREFIX}/ask", responses={200: {"model": Answer}})
    async def ask(req: AskRequest, request: Request) -> Response:
        """One question; ``Accept: text/event-stream`` streams ``progress``, ``token`` then ``answer``."""
        engine.slot(req.model)
        return await run(
            request, lambda t, emit: engine.ask(req, t, emit or _ignore), "answer", wants_stream(request)
        )

    @app.post(f"{PREFIX}/describe", responses={200: {"model": DescribeResult}})
    async def describe(req: DescribeRequest, request: Request) -> Response:
        """Every polygon annotation of a collection; streams ``progress`` / ``result`` then ``describe``."""
        engine.slot(req.model)
        return await run(
            request, lambda t, emit: engine.describe(req, t, emit), "describe", wants_stream(request)
        )

    app.add_middleware(_Gate, engine=engine, token=token, max_body=config.max_body_bytes)
    if config.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=config.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Accept", "X-Filename"],
            expose_headers=[VERSION_HEADER, "Retry-After"],
        )
    app.add_middleware(_VersionHeader)
    return app


def _ignore(event: str, data: Any) -> None:
    """An ``emit`` that drops events (JSON replies)."""


def _released(engine: Engine, ticket: Ticket, fn: Callable[[], Any]) -> Callable[[], Any]:
    def call() -> Any:
        try:
            return fn()
        finally:
            engine.release(ticket)

    return call


async def _events(
    queue: asyncio.Queue[tuple[str | None, Any]], ticket: Ticket, deadline: float
) -> AsyncIterator[bytes]:
    """The SSE body: events as the worker emits them, until the final one; a client gone cancels the work."""
    loop = asyncio.get_running_loop()
    try:
        while True:
            left = deadline - loop.time()
            if left <= 0:
                ticket.cancel("timeout")
                e = error_of(Cancelled("timeout"), ticket)
                yield sse("error", ErrorBody(error=ErrorDetail(code=e.code, message=e.message)))  # type: ignore[arg-type]
                return
            try:
                event, data = await asyncio.wait_for(queue.get(), left)
            except TimeoutError:
                continue
            if event is None:
                return
            yield sse(event, data)
            if event in FINAL_EVENTS:
                return
    finally:
        ticket.cancel("disconnected")  # no-op for finished work; frees the decode slot of unfinished work
