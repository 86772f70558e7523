"""A real ``wsi-llava serve`` process on a free 127.0.0.1 port, for the server's and the clients' tests.

``running_server(tmp, slides)`` copies ``slides`` into a fresh slides root, starts the server with
``--port 0`` (it prints the port it bound), waits for ``/v1/health`` and yields a :class:`ServeProcess`;
the process is stopped (SIGTERM, then SIGKILL) when the block ends, pass or fail. The server's stderr
goes to ``ServeProcess.log`` (shown when it fails to start).
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from kits.processes import stop

_LINE = re.compile(r"^wsi-llava serve: (http://\S+) ")


@dataclass
class ServeProcess:
    """A started server: its base URL, bearer token (None without ``--token-file``), slides root and process."""

    url: str
    token: str | None
    root: Path
    proc: subprocess.Popen
    log: Path
    args: list[str] = field(default_factory=list)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def client(self, **kw: Any) -> httpx.Client:
        """An httpx client for this server, the token already in its headers."""
        kw.setdefault("timeout", 120)
        return httpx.Client(base_url=self.url, headers=self.headers, **kw)

    def health(self) -> dict[str, Any]:
        r = httpx.get(f"{self.url}/v1/health", timeout=10)
        r.raise_for_status()
        return r.json()

    def stderr(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_idle(self, timeout: float = 120) -> dict[str, Any]:
        """The queue state once nothing runs or waits; fails the test after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            q = self.health()["queue"]
            if q["running"] == 0 and q["queued"] == 0:
                return q
            time.sleep(0.1)
        raise AssertionError(f"the server never went idle: {q}")


def own_cache(folder: Path) -> Path:
    """``folder`` as a cache of its own (``--cache``) that shares the test session's converted LLM weights.

    Features are extracted afresh there, as a test of first requests needs, without converting the model's
    GGUF again (its ``llm/`` links to the session cache's).
    """
    folder.mkdir(parents=True, exist_ok=True)
    shared = Path(os.environ["WSI_LLAVA_CACHE"]) / "llm"
    shared.mkdir(parents=True, exist_ok=True)
    link = folder / "llm"
    if not link.exists():
        link.symlink_to(shared, target_is_directory=True)
    return folder


def sse_events(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """``(event, data)`` of a server-sent event stream, as its lines arrive."""
    event, data = "message", []
    for line in lines:
        if line == "":
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())


@contextlib.contextmanager
def running_server(
    tmp: Path,
    slides: Iterable[Path] = (),
    *,
    args: Iterable[str] = (),
    token: bool = False,
    models: Iterable[str] = ("demo",),
    env: dict[str, str] | None = None,
    start_timeout: float = 180,
) -> Iterator[ServeProcess]:
    """Start ``wsi-llava serve`` on 127.0.0.1 with the ``slides`` copied into ``tmp/slides``; stop it after."""
    tmp.mkdir(parents=True, exist_ok=True)
    root = tmp / "slides"
    root.mkdir(exist_ok=True)
    for s in slides:
        shutil.copyfile(s, root / Path(s).name)
    secret = None
    cmd = [sys.executable, "-m", "wsi_llava.cli", "serve", "--slides-root", str(root), "--port", "0"]
    cmd += ["--device", "cpu", "--uploads", str(tmp / "uploads")]
    for m in models:
        cmd += ["--model", m]
    if token:
        secret = secrets.token_urlsafe(24)
        token_file = tmp / "token"
        token_file.write_text(secret + "\n")
        token_file.chmod(0o600)
        cmd += ["--token-file", str(token_file)]
    cmd += list(args)
    log = tmp / "serve.log"
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=err, env=full_env, text=True, start_new_session=True
        )
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    try:
        url = _wait_for_url(proc, lines, log, start_timeout)
        server = ServeProcess(url=url, token=secret, root=root, proc=proc, log=log, args=cmd)
        _wait_healthy(server, start_timeout)
        yield server
    finally:
        stop(proc, timeout=40)


def _wait_for_url(proc: subprocess.Popen, lines: queue.Queue, log: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        if line is None:
            break
        m = _LINE.match(line)
        if m:
            return m.group(1)
    raise AssertionError(
        f"wsi-llava serve did not start (exit {proc.poll()}):\n{log.read_text(errors='replace')[-4000:]}"
    )


def _wait_healthy(server: ServeProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.url}/v1/health", timeout=5).status_code == 200:
                return
        if server.proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"wsi-llava serve never answered /v1/health:\n{server.stderr()[-4000:]}")
