"""``wsi-llava serve --workers 2``: one model worker process each, slides routed by rendezvous hashing.

A real server process on 127.0.0.1 with two CPU workers running the demo model, two synthetic slides named
so that they route to different workers. Answers are compared with the same greedy question asked
in-process through ``SlideSession``; the per-worker counts of ``/v1/health`` say where each request went.
The last test kills a worker (it is started again) and then stops the server, so it runs last.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
from kits.serve import running_server, sse_events

from wsi_llava.answer import Answer
from wsi_llava.serve.schemas import Health, WorkerInfo
from wsi_llava.serve.workers import rendezvous

Q = "What is the diagnosis?"
TOKENS = 12
WORKERS = ["0:cpu", "1:cpu"]  # the workers' routing names: position and device


def _named_slides(world: Path, out: Path) -> tuple[Path, Path]:
    """The world's two slides, the second renamed so that the two route to different workers."""
    out.mkdir(parents=True, exist_ok=True)
    a = out / "slide_000.tif"
    shutil.copyfile(world / "slides" / "slide_000.tif", a)
    home = rendezvous(a.name, WORKERS)
    for k in range(100):
        name = f"b{k}_slide_001.tif"
        if rendezvous(name, WORKERS) != home:
            b = out / name
            shutil.copyfile(world / "slides" / "slide_001.tif", b)
            return a, b
    raise AssertionError("no name routes away from slide A")  # pragma: no cover


@pytest.fixture(scope="module")
def pool(world, tmp_path_factory):
    """``(server, in-process demo model, slide A, slide B)``; the model loads while the server starts."""
    from wsi_llava.model import load_model

    tmp = tmp_path_factory.mktemp("serve-workers")
    a, b = _named_slides(world, tmp / "named")
    with ThreadPoolExecutor(1) as ex:
        model = ex.submit(load_model, "demo", device="cpu")
        with running_server(tmp, [a, b], args=["--workers", "2", "--log-level", "info"]) as srv:
            yield srv, model.result(), a.name, b.name


def health(srv) -> Health:
    return Health.model_validate(srv.health())


def detail(srv) -> list[WorkerInfo]:
    d = health(srv).queue.workers_detail
    assert d is not None and len(d) == 2
    return d


def wait_for(srv, what, timeout: float = 120) -> list[WorkerInfo]:
    """Poll ``/v1/health`` until ``what(workers_detail)`` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        d = detail(srv)
        if what(d):
            return d
        time.sleep(0.1)
    raise AssertionError(f"workers never reached the state waited for: {detail(srv)}\n{srv.stderr()[-3000:]}")


def ask(srv, slide: str, **kw) -> httpx.Response:
    body = {"slide": slide, "question": Q, "max_new_tokens": TOKENS, "evidence": False, **kw}
    return httpx.post(f"{srv.url}/v1/ask", json=body, timeout=300)


def offline(model, path: Path) -> Answer:
    from wsi_llava.session import SlideSession

    with SlideSession(path, model, device="cpu") as s:
        return s.ask(Q, max_new_tokens=TOKENS, evidence=False)


def same(a: Answer, b: Answer) -> None:
    assert a.model_dump(exclude={"timings"}) == b.model_dump(exclude={"timings"})


def test_slides_stay_on_their_worker_and_answer_as_in_process(pool):
    srv, model, a, b = pool
    home_a, home_b = rendezvous(a, WORKERS), rendezvous(b, WORKERS)
    h = health(srv)
    assert h.workers == 2 and h.status == "ok"
    before = detail(srv)
    assert all(w.alive and w.pid for w in before) and before[0].pid != before[1].pid

    answers = {}
    for slide in (a, b, a, b):
        r = ask(srv, slide)
        assert r.status_code == 200, r.text
        answers.setdefault(slide, []).append(Answer.model_validate(r.json()))
    # streamed, slide A: the tokens make the answer
    body = {"slide": a, "question": Q, "max_new_tokens": TOKENS, "evidence": False}
    with httpx.stream(
        "POST", f"{srv.url}/v1/ask", json=body, headers={"Accept": "text/event-stream"}, timeout=300
    ) as r:
        assert r.status_code == 200
        events = list(sse_events(r.iter_lines()))
    assert events[-1][0] == "answer"
    streamed = Answer.model_validate_json(events[-1][1])
    assert "".join(json.loads(d)["text"] for e, d in events if e == "token").strip() == streamed.answer

    after = detail(srv)
    routed = [after[i].routed - before[i].routed for i in range(2)]
    assert routed[home_a] == 3 and routed[home_b] == 2  # every request for a slide went to its worker
    # each slide featurized once in all: by its own worker, however many requests asked
    assert after[home_a].extractions == 1 and after[home_b].extractions == 1
    assert health(srv).queue.extractions == 2

    for slide, got in answers.items():
        want = offline(model, srv.root / slide)
        for g in got:
            same(g, want)
    same(streamed, answers[a][0])
    assert answers[a][0].answer != answers[b][0].answer  # two slides, two answers


def test_client_disconnect_stops_the_workers_stream(pool):
    srv, _, _, b = pool
    home = rendezvous(b, WORKERS)
    before = detail(srv)[home]
    # sampled with a seed: an answer that runs long unless it is stopped
    body = {
        "slide": b,
        "question": Q,
        "max_new_tokens": 200,
        "temperature": 1.0,
        "seed": 1,
        "evidence": False,
    }
    with httpx.stream(
        "POST", f"{srv.url}/v1/ask", json=body, headers={"Accept": "text/event-stream"}, timeout=300
    ) as r:
        assert r.status_code == 200
        for event, _ in sse_events(r.iter_lines()):
            if event == "token":
                break  # and hang up mid-answer
    d = wait_for(srv, lambda d: d[home].cancelled == before.cancelled + 1 and d[home].in_hand == 0)
    assert d[home].running == 0 and d[home].routed == before.routed + 1
    assert health(srv).queue.running == 0
    assert ask(srv, b).status_code == 200  # the worker answers on


def test_a_dead_worker_fails_only_its_request_is_restarted_then_sigterm_leaves_no_process(pool):
    """Kill the worker of slide A mid-request: that request gets a 500 naming it, B's is answered. The dead
    worker is started again (logged, counted in /v1/health), and A's next request goes to it and is answered
    as before. Then SIGTERM (to the server's process group) drains and ends all."""
    srv, _, a, b = pool
    home_a, home_b = rendezvous(a, WORKERS), rendezvous(b, WORKERS)
    first = ask(srv, a)
    assert first.status_code == 200, first.text
    before = detail(srv)
    victim = before[home_a]
    assert victim.state == "running" and victim.restarts == 0

    os.kill(victim.pid, signal.SIGSTOP)  # frozen: the request below stays in its hands until it is killed
    replies: dict[str, httpx.Response] = {}
    threads = [
        threading.Thread(target=lambda s=s: replies.__setitem__(s, ask(srv, s)), daemon=True) for s in (a, b)
    ]
    for t in threads:
        t.start()
    wait_for(srv, lambda d: d[home_a].in_hand == 1)
    os.kill(victim.pid, signal.SIGKILL)
    for t in threads:
        t.join(300)
    dead = replies[a]
    assert dead.status_code == 500, dead.text
    err = dead.json()["error"]
    assert err["code"] == "internal"
    assert f"model worker {home_a} (cpu, pid {victim.pid})" in err["message"] and "Traceback" not in dead.text
    assert replies[b].status_code == 200, replies[b].text

    # started again after a pause: a new process, health shows the restart
    d = wait_for(srv, lambda d: d[home_a].alive and d[home_a].restarts == 1, timeout=240)
    reborn = d[home_a]
    assert reborn.state == "running" and reborn.pid not in (None, victim.pid) and reborn.in_hand == 0
    assert health(srv).workers == 2 and psutil.pid_exists(reborn.pid)
    log = srv.stderr()
    assert f"model worker {home_a} (cpu, pid {victim.pid}) stopped" in log
    assert f"model worker {home_a} (cpu): starting it again in" in log
    assert f"model worker {home_a} (cpu, pid {reborn.pid}) started again (restart 1)" in log
    again = ask(srv, a)  # slide A goes to its own worker again, with the same answer
    assert again.status_code == 200, again.text
    same(Answer.model_validate(again.json()), Answer.model_validate(first.json()))
    d = detail(srv)
    assert d[home_a].routed == reborn.routed + 1 and d[home_a].extractions == 1  # featurized by the new one
    assert health(srv).queue.extractions >= 3  # the earlier lives' count stays in the server's total

    # SIGTERM to the whole group (as Ctrl-C would): the workers ignore it, the server drains a running
    # answer, stops its workers and exits 0
    pids = [w.pid for w in d]
    reply: list[httpx.Response] = []
    t = threading.Thread(target=lambda: reply.append(ask(srv, b, max_new_tokens=16)), daemon=True)
    t.start()
    wait_for(srv, lambda d: d[home_b].in_hand == 1)
    os.killpg(srv.proc.pid, signal.SIGTERM)
    t.join(300)
    assert reply and reply[0].status_code == 200, reply and reply[0].text
    assert srv.proc.wait(120) == 0
    for pid in (victim.pid, *pids):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
