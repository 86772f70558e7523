"""32 users at once on one ``wsi-llava serve``: every one gets its own whole answer, the same as asking alone.

A real server process (demo model, CPU) and 32 threads with httpx asking different questions about two
synthetic slides, whole slide and regions, half streamed and half JSON; the references are the same
questions asked one by one in-process through ``SlideSession``. Features are extracted once per slide.
"""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from kits.serve import own_cache, running_server, sse_events

from wsi_llava.answer import Answer

TOKENS = 4
QUESTIONS = [
    "What is the diagnosis?",
    "Describe the tissue.",
    "What is the grade of the tumour?",
    "Is there necrosis?",
    "What is the histological type?",
    "Are there mitoses?",
    "Describe the morphology.",
    "Is the margin involved?",
]
RECT = {"x": 256, "y": 256, "width": 1280, "height": 1024}


@pytest.fixture(scope="module")
def srv(world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-load")
    slides = sorted((world / "slides").glob("*.tif"))
    # a cache of its own: this server's first requests are the concurrent ones below
    with running_server(tmp, slides, args=["--cache", str(own_cache(tmp / "cache"))]) as s:
        yield s


def _requests() -> list[dict]:
    out = []
    for i in range(32):
        body = {
            "slide": f"slide_00{i % 2}.tif",
            "question": QUESTIONS[(i // 2) % len(QUESTIONS)],
            "max_new_tokens": TOKENS,
            "evidence": False,  # the evidence pass is compared in test_serve_api
        }
        if (i // 16) % 2:
            body["rectangle"] = RECT
        out.append(body)
    return out


def _ask(url: str, body: dict, stream: bool) -> tuple[Answer, str | None]:
    if not stream:
        r = httpx.post(f"{url}/v1/ask", json=body, timeout=600)
        assert r.status_code == 200, r.text
        return Answer.model_validate(r.json()), None
    with httpx.stream(
        "POST", f"{url}/v1/ask", json=body, headers={"Accept": "text/event-stream"}, timeout=600
    ) as r:
        assert r.status_code == 200
        events = list(sse_events(r.iter_lines()))
    assert events[-1][0] == "answer", events[-1]
    tokens = "".join(json.loads(d)["text"] for e, d in events if e == "token")
    return Answer.model_validate_json(events[-1][1]), tokens


def test_32_concurrent_clients_get_their_own_answers(srv):
    from wsi_llava.model import load_model
    from wsi_llava.session import SlideSession
    from wsi_llava.slide.region import Region

    bodies = _requests()
    results: dict[int, tuple[Answer, str | None]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(bodies))

    def client(i: int) -> None:
        try:
            start.wait()
            results[i] = _ask(srv.url, bodies[i], stream=i % 2 == 0)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert sorted(results) == list(range(32))

    health = srv.health()
    assert health["queue"]["extractions"] == 2  # one per slide, however many asked at once
    assert health["queue"]["running"] == health["queue"]["queued"] == 0

    model = load_model("demo", device="cpu")
    sessions = {
        n: SlideSession(srv.root / n, model, device="cpu") for n in ("slide_000.tif", "slide_001.tif")
    }
    try:
        for i, body in enumerate(bodies):
            region = Region.rectangle(*RECT.values(), source="rectangle") if "rectangle" in body else None
            want = sessions[body["slide"]].ask(
                body["question"], region, max_new_tokens=TOKENS, evidence=False
            )
            got, tokens = results[i]
            assert got.model_dump(exclude={"timings"}) == want.model_dump(exclude={"timings"}), i
            if tokens is not None:
                assert tokens.strip() == got.answer
            assert not got.evidence.scores
    finally:
        for s in sessions.values():
            s.close()
