"""An OpenAI-compatible chat judge (OpenAI, vLLM, Ollama, llama.cpp server ...) over plain HTTP.

Standard library only (``urllib``). The API key is read from an environment variable (never from
the command line); 429, 5xx, time-outs and refused connections are retried with exponential
back-off (``Retry-After`` is honoured); a semaphore limits concurrent requests.
"""

from __future__ import annotations

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
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return resp.status, dict(resp.headers), resp.read()
            except urllib.error.HTTPError as e:
                return e.code, dict(e.headers or {}), e.read() or b""

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
            except (ConnectionError, OSError) as e:
                last = f"connection failed ({e})"
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
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError):
            raise JudgeError(
                f"judge {self.name} at {self.url}: the reply is not a chat completion "
                f"(expected choices[0].message.content): {raw[:200]!r}"
            ) from None
        return content if isinstance(content, str) else ""
