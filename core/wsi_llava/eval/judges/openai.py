"""An OpenAI-compatible chat judge (OpenAI, vLLM, Ollama, llama.cpp server ...) over plain HTTP.

Standard library only (``urllib``). The API key is read from an environment variable (never from
the command line); 429, 5xx, time-outs and refused connections are retried with exponential
back-off (``Retry-After`` is honoured); a semaphore limits concurrent requests. The time-out is a
total deadline per request (connect, headers and body together): a server that sends a byte now and
then cannot stretch it.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from wsi_llava.eval.judges.base import JudgeError, Messages

logger = logging.getLogger(__name__)

DEFAULT_URL = "https://api.openai.com/v1"


class _Deadline:
    """Shuts down every socket of one request when its total time is up (unblocking any read)."""

    def __init__(self, seconds: float) -> None:
        self.expired = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()

    def create_connection(self, *args: Any, **kwargs: Any) -> socket.socket:
        sock = socket.create_connection(*args, **kwargs)
        with self._lock:
            self._socks.append(sock)
            if self.expired:
                _shutdown(sock)
        return sock

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._socks:
                _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the raw socket, under TLS too


class _DeadlineOpen:
    """Mixed into urllib's HTTP(S) handlers: their connections open sockets through a ``_Deadline``."""

    deadline: _Deadline

    def do_open(self, http_class: Any, req: Any, **kwargs: Any) -> Any:
        deadline = self.deadline

        def connection(*args: Any, **kw: Any) -> Any:
            conn = http_class(*args, **kw)
            conn._create_connection = deadline.create_connection
            return conn

        return super().do_open(connection, req, **kwargs)  # type: ignore[misc]


class _HTTPHandler(_DeadlineOpen, urllib.request.HTTPHandler):
    pass


class _HTTPSHandler(_DeadlineOpen, urllib.request.HTTPSHandler):
    pass


def _opener(deadline: _Deadline) -> urllib.request.OpenerDirector:
    """urllib's usual opener (proxies, redirects, HTTPError), its sockets bound to ``deadline``."""
    handlers = []
    for cls in (_HTTPHandler, _HTTPSHandler):
        h = cls()
        h.deadline = deadline
        handlers.append(h)
    return urllib.request.build_opener(*handlers)


class OpenAIJudge:
    """``POST {url}/chat/completions`` with ``model`` and ``messages``; returns the first choice's text."""

    def __init__(
        self,
        model: str,
        url: str | None = None,
        key_env: str = "OPENAI_API_KEY",
        timeout: float = 120.0,
        retries: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        concurrency: int = 4,
        temperature: float | None = None,
        max_tokens: int | None = None,
    ) -> None:
        self.model = model
        self.url = (url or DEFAULT_URL).rstrip("/")
        if not self.url.endswith("/chat/completions"):
            self.url += "/chat/completions"
        self.key_env = key_env
        self.key = os.environ.get(key_env) or None
        if self.key is None and "api.openai.com" in self.url:
            raise JudgeError(f"judge openai:{model}: set the API key in the environment variable {key_env}")
        self.timeout = float(timeout)
        if not self.timeout > 0:
            raise JudgeError(f"--judge-timeout {timeout}: expected seconds > 0 (a deadline per request)")
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.concurrency = max(1, int(concurrency))
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.name = f"openai:{model}"
        self._slots = threading.BoundedSemaphore(self.concurrency)
        self.requests = 0

    def _body(self, messages: Messages) -> bytes:
        body: dict[str, Any] = {"model": self.model, "messages": messages}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        return json.dumps(body).encode("utf-8")

    def _post(self, data: bytes) -> tuple[int, dict[str, str], bytes]:
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        with self._slots:
            self.requests += 1
            with _Deadline(self.timeout) as deadline:
                try:
                    try:
                        with _opener(deadline).open(req, timeout=self.timeout) as resp:
                            got = resp.status, dict(resp.headers), resp.read()
                    except urllib.error.HTTPError as e:
                        got = e.code, dict(e.headers or {}), e.read() or b""
                except (OSError, http.client.HTTPException):
                    if deadline.expired:
                        raise TimeoutError from None
                    raise
            if deadline.expired:  # a body cut at the deadline may read as complete
                raise TimeoutError
            return got

    def complete(self, messages: Messages) -> str:
        data = self._body(messages)
        last = ""
        for attempt in range(self.retries + 1):
            wait = min(self.max_backoff, self.backoff * (2**attempt))
            try:
                status, headers, raw = self._post(data)
            except TimeoutError:
                last = f"no answer within {self.timeout:g} s"
            except urllib.error.URLError as e:
                reason = e.reason
                last = (
                    f"no answer within {self.timeout:g} s"
                    if isinstance(reason, TimeoutError | socket.timeout)
                    else f"cannot connect ({reason})"
                )
            except (ConnectionError, OSError, http.client.HTTPException) as e:
                last = f"connection failed ({e or type(e).__name__})"
            else:
                if status == 200:
                    return self._text(raw)
                snippet = raw[:200].decode("utf-8", "replace")
                if status == 429 or status >= 500:
                    last = f"HTTP {status} {snippet}".strip()
                    retry_after = headers.get("Retry-After") or headers.get("retry-after")
                    if retry_after and retry_after.replace(".", "", 1).isdigit():
                        wait = min(self.max_backoff, max(wait, float(retry_after)))
                else:
                    hint = f" (check the key in ${self.key_env})" if status in (401, 403) else ""
                    raise JudgeError(f"judge {self.name} at {self.url}: HTTP {status}{hint}: {snippet}")
            if attempt < self.retries:
                logger.info(
                    "judge %s: %s; retry %d/%d in %.2f s", self.name, last, attempt + 1, self.retries, wait
                )
                time.sleep(wait)
        raise JudgeError(
            f"judge {self.name} at {self.url}: {last} (gave up after {self.retries + 1} attempts)"
        )

    def _text(self, raw: bytes) -> str:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise JudgeError(
                f"judge {self.name} at {self.url}: the reply is not UTF-8 text ({e.reason} at byte {e.start}): "
                f"{raw[:200]!r}"
            ) from None
        try:
            content = json.loads(text)["choices"][0]["message"]["content"]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError):
            raise JudgeError(
                f"judge {self.name} at {self.url}: the reply is not a chat completion "
                f"(expected choices[0].message.content): {raw[:200]!r}"
            ) from None
        return content if isinstance(content, str) else ""
