"""``wsi-llava serve`` options on a real server process: ``--max-sessions`` (the open-slide LRU), ``--timeout``
(504, or an error event on a stream already started, and the work stopped), and a quiet stderr (no progress
bars while the models load; the log stays)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import httpx
import pytest
from kits.cli import assert_user_error
from kits.serve import running_server, sse_events

Q = "What is the diagnosis?"
TIMEOUT = 6  # s: the short answers below take well under a second each, the long ones minutes
SHORT = {"question": Q, "max_new_tokens": 2, "evidence": False}
LONG = {"question": Q, "max_new_tokens": 3000, "temperature": 5.0, "seed": 1, "evidence": False}


@pytest.fixture(scope="module")
def srv(world, tmp_path_factory):
    slides = sorted((world / "slides").glob("*.tif"))
    args = ["--max-sessions", "1", "--timeout", str(TIMEOUT), "--log-level", "info"]
    with running_server(tmp_path_factory.mktemp("serve-options"), slides, args=args) as s:
        yield s


def test_a_served_start_prints_no_progress_bars(srv):
    log = srv.stderr()
    assert "model demo loaded on cpu" in log  # wsi_llava's own log stays
    bars = [line for line in re.split(r"[\r\n]", log) if re.search(r"\d+%\||\bit/s\]", line)]
    assert not bars, bars[:3]


def test_max_sessions_keeps_that_many_slides_open(srv):
    for slide in ("slide_000.tif", "slide_001.tif", "slide_000.tif"):
        r = httpx.post(f"{srv.url}/v1/ask", json={**SHORT, "slide": slide}, timeout=120)
        assert r.status_code == 200, r.text
    # one open slide: the second request closed slide_000, the third opened it again (from the cache)
    assert srv.health()["queue"]["extractions"] == 3


def test_max_sessions_is_checked_and_documented(tmp_path):
    (tmp_path / "slides").mkdir()
    cmd = [sys.executable, "-m", "wsi_llava.cli", "serve", "--slides-root", str(tmp_path / "slides")]
    out = subprocess.run([*cmd, "--port", "0", "--max-sessions", "0"], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert_user_error(out, "--max-sessions", "greater than or equal to 1")
    out = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--max-sessions" in out.stdout and "least recently used" in out.stdout


def test_a_request_past_the_timeout_gets_504_and_its_work_stops(srv):
    r = httpx.post(f"{srv.url}/v1/ask", json={**LONG, "slide": "slide_000.tif"}, timeout=120)
    assert r.status_code == 504, r.text
    err = r.json()["error"]
    assert err["code"] == "timeout" and "--timeout" in err["message"]
    assert srv.wait_idle()["running"] == 0  # the decode was stopped, not left running

    # a stream already started: its last event is the timeout error
    with httpx.stream(
        "POST",
        f"{srv.url}/v1/ask",
        json={**LONG, "slide": "slide_000.tif", "seed": 2},
        headers={"Accept": "text/event-stream"},
        timeout=120,
    ) as s:
        assert s.status_code == 200
        events = list(sse_events(s.iter_lines()))
    assert "token" in [e for e, _ in events] and events[-1][0] == "error", events[-3:]
    assert json.loads(events[-1][1])["error"]["code"] == "timeout"
    srv.wait_idle()
    r = httpx.post(f"{srv.url}/v1/ask", json={**SHORT, "slide": "slide_000.tif"}, timeout=120)
    assert r.status_code == 200, r.text
