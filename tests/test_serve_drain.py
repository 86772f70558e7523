"""``wsi-llava serve`` start-up refusals and SIGTERM: draining health, 503 for new requests, running answers
finish or end with a ``draining`` error event after the grace period, then exit status 0."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import httpx
from kits.cli import assert_user_error
from kits.serve import running_server, sse_events

Q = "What is the diagnosis?"


def test_non_loopback_without_token_refuses_to_start(tmp_path):
    (tmp_path / "slides").mkdir()
    out = subprocess.run(
        [sys.executable, "-m", "wsi_llava.cli", "serve", "--slides-root", str(tmp_path / "slides"),
         "--host", "0.0.0.0", "--port", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert_user_error(out, "--token-file", "0.0.0.0")
    out = subprocess.run(
        [sys.executable, "-m", "wsi_llava.cli", "serve", "--slides-root", str(tmp_path / "nope"), "--port", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert_user_error(out, "--slides-root")


def _stream(url: str, body: dict, events: list, started: threading.Event) -> None:
    with httpx.stream(
        "POST", f"{url}/v1/ask", json=body, headers={"Accept": "text/event-stream"}, timeout=300
    ) as r:
        for event, data in sse_events(r.iter_lines()):
            events.append((event, data))
            if event == "token":
                started.set()


def test_sigterm_drains_then_exits_0(world, tmp_path):
    slides = [world / "slides" / "slide_000.tif"]
    with running_server(tmp_path, slides, args=["--drain-seconds", "20"]) as srv:
        long_events: list = []
        short_events: list = []
        long_started, short_started = threading.Event(), threading.Event()
        long_body = {"slide": "slide_000.tif", "question": Q, "max_new_tokens": 3000, "temperature": 5.0,
                     "seed": 1, "evidence": False}  # fmt: skip
        t_long = threading.Thread(target=_stream, args=(srv.url, long_body, long_events, long_started))
        t_long.start()
        assert long_started.wait(120), long_events
        short_body = {"slide": "slide_000.tif", "question": Q, "max_new_tokens": 40, "temperature": 5.0,
                      "seed": 2, "evidence": False}  # fmt: skip
        t_short = threading.Thread(target=_stream, args=(srv.url, short_body, short_events, short_started))
        t_short.start()
        assert short_started.wait(120), short_events
        srv.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while srv.health()["status"] != "draining":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = httpx.post(f"{srv.url}/v1/ask", json=short_body, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "draining"
        t_short.join(120)
        t_long.join(120)
        assert short_events[-1][0] == "answer"  # a running answer that ends within the grace finishes
        assert long_events[-1][0] == "error", long_events[-3:]
        assert json.loads(long_events[-1][1])["error"]["code"] == "draining"
        assert srv.proc.wait(60) == 0, srv.stderr()[-3000:]
