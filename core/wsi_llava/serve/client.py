"""The Python client of a ``wsi-llava serve`` server: the CLI, napari and the QuPath bridge ask through it.

One :class:`ServerClient` per server URL. Every failure becomes one :class:`ServerError` subclass whose
message names the URL and what went wrong (name not resolved, refused, timeout, TLS, 401, 403, 404, 413,
429, 503, an API version the client does not speak, a reply that is not the API's JSON), so a frontend
shows one line and no traceback. The bearer token is sent, never logged.

Streams (``Accept: text/event-stream``) yield the wire models of :mod:`wsi_llava.serve.schemas`:
:class:`Progress`, :class:`TokenEvent` / :class:`RegionOutcome`, and the final :class:`Answer` or
:class:`DescribeResult`; an ``error`` event raises. Closing a stream closes its connection. Replies are
read with :func:`~wsi_llava.serve.schemas.parse_reply` (fields a newer server added are ignored).
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ValidationError

from wsi_llava.answer import Answer
from wsi_llava.errors import Cancelled, WsiLlavaError
from wsi_llava.serve.schemas import (
    API_VERSION,
    VERSION_HEADER,
    AskRequest,
    DescribeRequest,
    DescribeResult,
    ErrorBody,
    ExtractRequest,
    Health,
    Job,
    ModelList,
    Progress,
    RegionOutcome,
    SlideRef,
    TokenEvent,
    parse_reply,
)

logger = logging.getLogger(__name__)

#: where a token comes from when no ``--token-file`` is given
TOKEN_ENV = "WSI_LLAVA_TOKEN"
#: seconds to open a connection; a reply (or the next stream event) may take ``timeout``
CONNECT_TIMEOUT = 10.0
DEFAULT_TIMEOUT = 300.0
UPLOAD_CHUNK = 1 << 20
M = TypeVar("M", bound=BaseModel)


# --- errors ---------------------------------------------------------------------------------------------
class ServerError(WsiLlavaError):
    """A request to a wsi-llava server failed; the message names the server's URL and the cause."""

    def __init__(self, message: str, url: str = "", status: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.status = status


class NameNotResolved(ServerError):
    """The server's host name does not resolve (a typo, or a name only the lab's network knows)."""


class ConnectionRefused(ServerError):
    """Nothing listens on the server's host and port."""


class ServerTimeout(ServerError):
    """The server did not answer (connect or reply) in time."""


class TLSFailed(ServerError):
    """The HTTPS handshake failed (self-signed or expired certificate, or plain HTTP on that port)."""


class Unauthorized(ServerError):
    """401: the server needs a bearer token and none was sent."""


class Forbidden(ServerError):
    """403: a wrong token, or a slide path outside the server's slides root (the server says which)."""


class NotFound(ServerError):
    """404: no such slide, upload, model or job on the server."""


class TooLarge(ServerError):
    """413: the request body or upload is over the server's limit."""


class Busy(ServerError):
    """429: the server's queue is full; ``retry_after`` seconds is when to try again (if it said)."""

    def __init__(
        self, message: str, url: str = "", status: int | None = 429, retry_after: float | None = None
    ):
        super().__init__(message, url, status)
        self.retry_after = retry_after


class Draining(ServerError):
    """503: the server is shutting down."""


class VersionMismatch(ServerError):
    """The server speaks another major API version than this client."""


class BadReply(ServerError):
    """The reply is not the wsi-llava API's JSON (a proxy's or another service's page)."""


_BY_STATUS: dict[int, type[ServerError]] = {
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    413: TooLarge,
    429: Busy,
    503: Draining,
    504: ServerTimeout,
}


# --- token and URL --------------------------------------------------------------------------------------
def read_token(token_file: str | Path | None = None) -> str | None:
    """The bearer token: the first line of ``token_file``, else ``$WSI_LLAVA_TOKEN``, else None."""
    if token_file is not None:
        path = Path(token_file).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
            raise WsiLlavaError(f"--token-file {path}: cannot read the server token ({reason})") from None
        token = text.strip().splitlines()[0].strip() if text.strip() else ""
        if not token:
            raise WsiLlavaError(f"--token-file {path}: the file is empty; it must hold the server's token")
        return token
    return os.environ.get(TOKEN_ENV, "").strip() or None


def normalise_url(url: str) -> str:
    """``url`` without a trailing slash or ``/v1``; a clear error unless it is ``http(s)://host[:port]``."""
    text = (url or "").strip().rstrip("/")
    if text.endswith("/v1"):
        text = text[: -len("/v1")]
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ServerError(
            f"--server {url!r}: expected the server's address as http://HOST:PORT or https://HOST:PORT",
            url=url,
        )
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise ServerError(f"--server {url!r}: the port is not a number", url=url) from None
    return text


def _api_major(api: str) -> str:
    """``"v1"`` of ``"v1"`` / ``"v1.2"``: the part whose change breaks clients."""
    return api.strip().lower().split(".")[0]


def _cause_chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


# --- the client -----------------------------------------------------------------------------------------
class ServerClient:
    """Requests to one wsi-llava server; one message per failure (see the module docstring)."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        verify: bool | str | ssl.SSLContext = True,
    ) -> None:
        self.url = normalise_url(url)
        self.timeout = timeout
        self._token = token
        headers = {"User-Agent": f"wsi-llava-client/{_package_version()}"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(CONNECT_TIMEOUT, timeout)),
            verify=verify,
            follow_redirects=False,
        )
        self._health: Health | None = None

    def __repr__(self) -> str:  # never shows the token
        return f"ServerClient({self.url!r}, token={'set' if self._token else 'none'})"

    def __enter__(self) -> ServerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # --- the transport: one place turns every failure into a named error --------------------------------
    def _where(self, path: str) -> str:
        return f"{self.url}{path}"

    def _transport_error(self, exc: httpx.HTTPError, path: str) -> ServerError:
        where = self._where(path)
        host = urlsplit(self.url).hostname
        if isinstance(exc, httpx.TimeoutException):
            phase = "to connect" if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout) else "to reply"
            limit = CONNECT_TIMEOUT if phase == "to connect" else self.timeout
            tls = any(isinstance(c, ssl.SSLError) for c in _cause_chain(exc)) or "handshake" in str(exc)
            extra = " (the TLS handshake got no answer: is this port HTTPS?)" if tls else ""
            return ServerTimeout(
                f"{where}: the server took longer than {min(limit, self.timeout):g} s {phase}{extra}; "
                "is the address right and the server up (a firewall may drop the connection)?",
                where,
            )
        for cause in _cause_chain(exc):
            if isinstance(cause, socket.gaierror):
                return NameNotResolved(
                    f"{where}: the host name {host!r} does not resolve (a typo, or a name only your lab's "
                    "network or VPN knows?)",
                    where,
                )
            if isinstance(cause, ssl.SSLCertVerificationError):
                return TLSFailed(
                    f"{where}: the server's TLS certificate is not trusted ({cause.verify_message or cause}); "
                    "use the certificate your lab gave you, or ask the server's admin",
                    where,
                )
            if isinstance(cause, ssl.SSLError):
                return TLSFailed(
                    f"{where}: the TLS (https) handshake failed ({cause.reason or cause}); is this port "
                    "HTTPS (try http://)?",
                    where,
                )
            if isinstance(cause, ConnectionRefusedError):
                return ConnectionRefused(
                    f"{where}: connection refused: nothing listens on {host} port "
                    f"{urlsplit(self.url).port or ('443' if self.url.startswith('https') else '80')}; "
                    "is `wsi-llava serve` running there, on this port?",
                    where,
                )
        if isinstance(exc, httpx.RemoteProtocolError):
            return BadReply(
                f"{where}: the server closed the connection or did not speak HTTP ({exc}); is this the "
                "wsi-llava server's address?",
                where,
            )
        return ServerError(f"{where}: cannot reach the server ({type(exc).__name__}: {exc})", where)

    def _error_from_reply(self, reply: httpx.Response, path: str) -> ServerError:
        """A named error for a non-2xx reply, with the server's own message when it sent an ErrorBody."""
        where = self._where(path)
        status = reply.status_code
        try:
            message = parse_reply(ErrorBody, reply.read()).error.message
        except (ValidationError, ValueError):
            message = None
        if message is None:
            if not (_is_json(reply) or status in _BY_STATUS):
                return _not_the_api(reply, where)
            message = reply.reason_phrase or f"HTTP {status}"
        return _named(where, status, message, _retry_after(reply))

    @contextmanager
    def _request(self, method: str, path: str, **kw: Any) -> Iterator[httpx.Response]:
        """One exchange; a 2xx reply is yielded (body unread), anything else raises a ServerError."""
        try:
            with self._http.stream(method, path, **kw) as reply:
                if not reply.is_success:
                    reply.read()
                    raise self._error_from_reply(reply, path)
                self._check_version_header(reply)
                yield reply
        except httpx.HTTPError as e:
            raise self._transport_error(e, path) from None

    def _json(self, method: str, path: str, model: type[M], **kw: Any) -> M:
        with self._request(method, path, **kw) as reply:
            reply.read()
            return _parse(reply, model, self._where(path))

    def _check_version_header(self, reply: httpx.Response) -> None:
        theirs = reply.headers.get(VERSION_HEADER)
        if theirs is None:
            return
        mine = _package_version()
        if theirs != mine and not getattr(self, "_version_noted", False):
            self._version_noted = True
            logger.info("server %s runs wsi-llava %s, this client %s", self.url, theirs, mine)

    # --- endpoints ----------------------------------------------------------------------------------
    def health(self) -> Health:
        """``GET /v1/health`` (no token needed); checks the API version (see :meth:`check_api`)."""
        health = self._json("GET", "/v1/health", Health)
        self._health = health
        self.check_api(health)
        return health

    def check_api(self, health: Health) -> None:
        """Refuse a server of another major API version; log a different minor version."""
        if _api_major(health.api) != _api_major(API_VERSION):
            raise VersionMismatch(
                f"{self.url}: the server speaks API {health.api} (wsi-llava {health.version}), this client "
                f"{API_VERSION} (wsi-llava {_package_version()}): install the same major version of wsi-llava "
                "on both sides",
                self.url,
            )
        if health.api != API_VERSION:
            logger.warning("server %s speaks API %s, this client %s", self.url, health.api, API_VERSION)

    def ensure_compatible(self) -> Health:
        """The server's health, fetched (and the API checked) once per client."""
        return self._health if self._health is not None else self.health()

    def models(self) -> ModelList:
        return self._json("GET", "/v1/models", ModelList)

    def upload(self, path: str | Path, on_progress: Callable[[int, int], None] | None = None) -> SlideRef:
        """``POST /v1/slides``: the file's bytes; the reply names it ``upload:<sha256>`` for later requests.

        Content-addressed on the server: uploading the same bytes again stores nothing new.
        """
        path = Path(path)
        if not path.is_file():
            raise WsiLlavaError(f"{path}: no such slide file to upload")
        size = path.stat().st_size

        def chunks() -> Iterator[bytes]:
            sent = 0
            with path.open("rb") as f:
                while block := f.read(UPLOAD_CHUNK):
                    sent += len(block)
                    if on_progress is not None:
                        on_progress(sent, size)
                    yield block

        headers = {
            "X-Filename": path.name.encode("ascii", "replace").decode(),
            "Content-Type": "application/octet-stream",
            "Content-Length": str(size),
        }
        return self._json("POST", "/v1/slides", SlideRef, content=chunks(), headers=headers)

    def ask_events(self, request: AskRequest) -> Iterator[Progress | TokenEvent | Answer]:
        """Stream ``POST /v1/ask``: progress and token events, then the :class:`Answer` (last)."""
        self.ensure_compatible()
        body = request.model_dump(mode="json", exclude_none=True)
        yield from self._events("/v1/ask", body, final="answer", final_model=Answer)

    def ask(
        self,
        request: AskRequest,
        on_token: Callable[[str], None] | None = None,
        on_progress: Callable[[int, int, str], None] | None = None,
    ) -> Answer:
        """The :class:`Answer` to ``request``; ``on_token`` sees each piece of text as it streams."""
        for event in self.ask_events(request):
            if isinstance(event, Answer):
                return event
            if isinstance(event, TokenEvent) and on_token is not None:
                on_token(event.text)
            elif isinstance(event, Progress) and on_progress is not None:
                on_progress(event.done, event.total, event.message)
        raise BadReply(f"{self._where('/v1/ask')}: the stream ended without an answer", self.url)

    def describe_events(
        self, request: DescribeRequest
    ) -> Iterator[Progress | RegionOutcome | DescribeResult]:
        """Stream ``POST /v1/describe``: progress, one result per annotation, then the DescribeResult."""
        self.ensure_compatible()
        body = request.model_dump(mode="json", exclude_none=True)
        yield from self._events("/v1/describe", body, final="describe", final_model=DescribeResult)

    def describe(
        self,
        request: DescribeRequest,
        on_result: Callable[[RegionOutcome], None] | None = None,
        on_progress: Callable[[int, int, str], None] | None = None,
    ) -> DescribeResult:
        """The described collection; ``on_result`` sees each annotation's outcome as it lands."""
        for event in self.describe_events(request):
            if isinstance(event, DescribeResult):
                return event
            if isinstance(event, RegionOutcome) and on_result is not None:
                on_result(event)
            elif isinstance(event, Progress) and on_progress is not None:
                on_progress(event.done, event.total, event.message)
        raise BadReply(f"{self._where('/v1/describe')}: the stream ended without a result", self.url)

    def extract(self, request: ExtractRequest) -> Job:
        """``POST /v1/extract``: start featurizing a slide on the server (a job; see :meth:`wait`)."""
        self.ensure_compatible()
        return self._json("POST", "/v1/extract", Job, json=request.model_dump(mode="json", exclude_none=True))

    def job(self, job_id: str) -> Job:
        return self._json("GET", f"/v1/jobs/{job_id}", Job)

    def cancel_job(self, job_id: str) -> Job:
        return self._json("DELETE", f"/v1/jobs/{job_id}", Job)

    def wait(
        self,
        job_id: str,
        poll: float = 0.5,
        on_progress: Callable[[int, int, str], None] | None = None,
        cancel: Any = None,
    ) -> Job:
        """Poll a job until it ends; a failed job raises its error, a ``cancel`` token cancels it."""
        while True:
            if cancel is not None and cancel.cancelled:
                self.cancel_job(job_id)
                raise Cancelled(f"job {job_id} on {self.url} was cancelled")
            job = self.job(job_id)
            if on_progress is not None:
                on_progress(job.progress.done, job.progress.total, job.progress.message)
            if job.state == "done":
                return job
            if job.state in ("failed", "cancelled"):
                detail = job.error.message if job.error is not None else job.state
                cls = Cancelled if job.state == "cancelled" else ServerError
                raise cls(f"{self._where('/v1/jobs/' + job_id)}: the {job.kind} job {job.state}: {detail}")
            time.sleep(poll)

    # --- server-sent events ----------------------------------------------------------------------------
    def _events(self, path: str, body: dict[str, Any], final: str, final_model: type[M]) -> Iterator[Any]:
        where = self._where(path)
        headers = {"Accept": "text/event-stream"}
        with self._request("POST", path, json=body, headers=headers) as reply:
            if "text/event-stream" not in reply.headers.get("content-type", ""):
                reply.read()
                if _is_json(reply):  # a server that answers in one piece: the final model
                    yield _parse(reply, final_model, where)
                    return
                raise _not_the_api(reply, where)
            try:
                for name, data in _sse(reply.iter_lines()):
                    if name == "error":
                        raise self._error_event(data, where)
                    if name == final:
                        yield _parse_text(data, final_model, where)
                        return
                    if name == "progress":
                        yield _parse_text(data, Progress, where)
                    elif name == "token":
                        yield _parse_text(data, TokenEvent, where)
                    elif name == "result":
                        yield _parse_text(data, RegionOutcome, where)
                    else:
                        logger.debug("ignoring stream event %r from %s", name, where)
            except httpx.HTTPError as e:
                raise self._transport_error(e, path) from None
        raise BadReply(f"{where}: the stream ended before its final {final!r} event", where)

    def _error_event(self, data: str, where: str) -> ServerError:
        try:
            detail = parse_reply(ErrorBody, data).error
        except (ValidationError, ValueError):
            return BadReply(f"{where}: an error event that is not the API's ErrorBody: {data[:200]!r}", where)
        if detail.code == "cancelled":
            return _CancelledByServer(f"{where}: cancelled: {detail.message}")
        status = _CODES.get(detail.code, 500)
        return _named(where, status, detail.message, None)


class _CancelledByServer(Cancelled, ServerError):
    """The server cancelled the answer (its job was cancelled)."""


#: the HTTP status an error event's code stands for
_CODES = {"bad_request": 400, "unauthorized": 401, "forbidden": 403, "not_found": 404, "too_large": 413,
          "invalid": 422, "busy": 429, "internal": 500, "draining": 503, "timeout": 504}  # fmt: skip


def _named(where: str, status: int, message: str, retry_after: float | None) -> ServerError:
    """The error for an HTTP status (or an error event's code) with the server's ``message``."""
    if status == 401:
        text = (
            f"401 unauthorized: {message}; give the server's token with --token-file FILE (or ${TOKEN_ENV})"
        )
    elif status == 403:
        text = f"403 forbidden: {message}"
    elif status == 404:
        text = f"404 not found: {message}"
    elif status == 413:
        text = f"413 too large: {message}"
    elif status == 429:
        when = f"; try again in {retry_after:g} s" if retry_after is not None else "; try again later"
        return Busy(f"{where}: 429 the server is busy: {message}{when}", where, status, retry_after)
    elif status == 503:
        text = f"503 the server is shutting down (draining): {message}"
    elif status == 504:
        text = f"504 the server's time limit for a request ran out: {message}"
    elif status in (400, 422):
        text = message
    else:
        text = f"{status} {message}"
    return _BY_STATUS.get(status, ServerError)(f"{where}: {text}", where, status)


def _sse(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    """``(event name, data)`` of a server-sent event stream (the WHATWG rules that matter here)."""
    name, data = "message", []
    for line in lines:
        if line == "":
            if data:
                yield name, "\n".join(data)
            name, data = "message", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            name = value
        elif field == "data":
            data.append(value)
    if data:
        yield name, "\n".join(data)


def _is_json(reply: httpx.Response) -> bool:
    return "json" in reply.headers.get("content-type", "")


def _not_the_api(reply: httpx.Response, where: str) -> BadReply:
    kind = reply.headers.get("content-type", "no content type").split(";")[0]
    what = "an HTML page" if "html" in kind else f"{kind!r}"
    return BadReply(
        f"{where}: the reply (HTTP {reply.status_code}) is {what}, not the wsi-llava API's JSON: is this the "
        "server's address, or is a proxy or login page in between?",
        where,
        reply.status_code,
    )


def _parse(reply: httpx.Response, model: type[M], where: str) -> M:
    if not _is_json(reply):
        raise _not_the_api(reply, where)
    return _parse_text(reply.text, model, where)


def _parse_text(text: str, model: type[M], where: str) -> M:
    try:
        return parse_reply(model, text)
    except ValidationError as e:
        first = e.errors()[0] if e.errors() else {}
        field = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise BadReply(
            f"{where}: the reply is not a {model.__name__} of API {API_VERSION} ({field}: "
            f"{first.get('msg', e)}): a server of another version?",
            where,
        ) from None
    except ValueError:
        raise BadReply(f"{where}: the reply is not JSON", where) from None


def _retry_after(reply: httpx.Response) -> float | None:
    value = reply.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("wsi-llava")
    except PackageNotFoundError:
        return "unknown"
