"""``wsi-llava serve``'s guards on a real server process: bearer token, slides-root confinement, body and
upload caps, the bounded queue, a client that goes away mid-stream, job cancel, and uploads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import numpy as np
import pytest
from kits.serve import own_cache, running_server, sse_events
from kits.slides import write_pyramid

from wsi_llava.answer import Answer
from wsi_llava.serve.schemas import VERSION_HEADER, Job, SlideRef

Q = "What is the diagnosis?"


def _tissue_slide(path: Path, size: int) -> Path:
    """A slide covered in tissue-coloured blocks: every tile is kept, so extraction takes several batches."""
    rng = np.random.default_rng(7)
    blocks = rng.integers(0, 120, (size // 64, size // 64, 3), dtype=np.uint8)
    level0 = np.kron(blocks, np.ones((64, 64, 1), dtype=np.uint8)) + np.array([120, 40, 90], dtype=np.uint8)
    return write_pyramid(path, level0, 0.5, compression="zlib")


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Path:
    """A folder beside the slides root, holding a FIFO: opening it would block, so a reply proves no open."""
    d = tmp_path_factory.mktemp("outside")
    os.mkfifo(d / "secret.tif")
    return d


@pytest.fixture(scope="module")
def srv(world, tmp_path_factory, outside):
    tmp = tmp_path_factory.mktemp("serve-limits")
    big = _tissue_slide(tmp / "big.tif", 3072)
    cap_mb = 1.5 * (world / "slides" / "slide_000.tif").stat().st_size / 2**20  # the slide fits, twice it not
    args = ["--max-batch", "1", "--queue", "0", "--max-body-mb", "0.01", "--max-upload-mb", f"{cap_mb:.3f}",
            "--cache", str(own_cache(tmp / "cache"))]  # fmt: skip
    with running_server(tmp, [world / "slides" / "slide_000.tif", big], args=args, token=True) as s:
        (s.root / "link.tif").symlink_to(outside / "secret.tif")
        (s.root / "sub").mkdir()
        yield s


def test_token(srv):
    r = httpx.get(f"{srv.url}/v1/health")
    assert r.status_code == 200 and r.json()["auth"] is True
    r = httpx.get(f"{srv.url}/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert r.headers[VERSION_HEADER]
    r = httpx.get(f"{srv.url}/v1/models", headers={"Authorization": "Bearer not-the-token-at-all"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    r = httpx.post(f"{srv.url}/v1/ask", json={"slide": "slide_000.tif", "question": Q})
    assert r.status_code == 401
    with srv.client() as c:
        assert c.get("/v1/models").status_code == 200


@pytest.mark.parametrize(
    "slide",
    ["../outside0/secret.tif", "sub/../../outside0/secret.tif", "ABS", "link.tif", "/etc/passwd"],
)
def test_paths_outside_the_root_are_refused_before_any_open(srv, outside, slide):
    if slide == "ABS":
        slide = str(outside / "secret.tif")
    slide = slide.replace("outside0", outside.name)
    with srv.client(timeout=30) as c:
        r = c.post("/v1/ask", json={"slide": slide, "question": Q, "max_new_tokens": 2, "evidence": False})
        assert r.status_code == 403, r.text  # a server that opened the FIFO would hang here instead
        assert r.json()["error"]["code"] == "forbidden" and "slides root" in r.json()["error"]["message"]
        r = c.post("/v1/extract", json={"slide": slide})
        assert r.status_code == 403
        r = c.post("/v1/ask", json={"slide": "missing.tif", "question": Q})
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_body_and_upload_caps(srv, world):
    with srv.client() as c:
        r = c.post("/v1/ask", json={"slide": "slide_000.tif", "question": "x" * 20000})
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
        assert "--max-body-mb" in r.json()["error"]["message"]

        size = (world / "slides" / "slide_000.tif").stat().st_size

        def chunks():  # no Content-Length: the cap is enforced while streaming
            for _ in range(20):
                yield b"\0" * (size // 10)

        r = c.post("/v1/slides", content=chunks(), headers={"X-Filename": "huge.svs"})
        assert r.status_code == 413 and "--max-upload-mb" in r.json()["error"]["message"]
        r = c.post("/v1/ask", json={"slide": "slide_000.tif", "question": Q, "max_new_tokens": "many"})
        assert r.status_code == 422 and "max_new_tokens" in r.json()["error"]["message"]
    uploads = Path(srv.root).parent / "uploads"
    assert not list(uploads.glob(".upload-*"))  # the partial file is gone


def test_upload_round_trip(srv, world):
    data = (world / "slides" / "slide_000.tif").read_bytes()
    with srv.client() as c:
        r = c.post("/v1/slides", content=data, headers={"X-Filename": "../case 1.TIF"})
        assert r.status_code == 200, r.text
        ref = SlideRef.model_validate(r.json())
        assert ref.existing is False and ref.size == len(data) and ref.filename == ref.sha256 + ".tif"
        again = SlideRef.model_validate(
            c.post("/v1/slides", content=data, headers={"X-Filename": "x.tif"}).json()
        )
        assert again.existing is True and again.slide == ref.slide
        body = {"question": Q, "max_new_tokens": 4, "evidence": False}
        by_upload = c.post("/v1/ask", json={**body, "slide": ref.slide})
        by_path = c.post("/v1/ask", json={**body, "slide": "slide_000.tif"})
        assert by_upload.status_code == by_path.status_code == 200, by_upload.text
        assert Answer.model_validate(by_upload.json()).answer == Answer.model_validate(by_path.json()).answer
        r = c.post("/v1/ask", json={**body, "slide": "upload:" + "0" * 64})
        assert r.status_code == 404
        r = c.post("/v1/ask", json={**body, "slide": "upload:../../etc"})
        assert r.status_code == 422
    stored = Path(srv.root).parent / "uploads" / ref.filename
    assert stored.read_bytes() == data


def test_full_queue_and_job_cancel(srv):
    """One slot: an extraction job holds it (429 for the next request); DELETE stops the job, freeing it,
    and the cache keeps nothing that looks complete."""
    from wsi_llava.features.cache import FeatureCache

    with srv.client() as c:
        r = c.post("/v1/extract", json={"slide": "big.tif"})
        assert r.status_code == 202, r.text
        job = Job.model_validate(r.json())
        with c.stream("GET", f"/v1/jobs/{job.id}/events") as events:
            lines = events.iter_lines()
            for event, data in sse_events(lines):
                assert event == "progress"
                if json.loads(data)["done"] > 0:
                    break
            busy = c.post("/v1/ask", json={"slide": "slide_000.tif", "question": Q, "max_new_tokens": 2})
            assert busy.status_code == 429 and busy.json()["error"]["code"] == "busy"
            assert int(busy.headers["Retry-After"]) > 0
            cancelled = Job.model_validate(c.delete(f"/v1/jobs/{job.id}").json())
            rest = list(sse_events(lines))
        assert cancelled.state == "cancelled" and cancelled.error.code == "cancelled"
        assert rest[-1][0] == "job" and Job.model_validate_json(rest[-1][1]).state == "cancelled"
        assert Job.model_validate(c.get(f"/v1/jobs/{job.id}").json()).state == "cancelled"
        assert c.get("/v1/jobs/nope").status_code == 404
        srv.wait_idle()
        entries = FeatureCache(Path(srv.root).parent / "cache" / "features").list()
        assert not [e for e in entries if "big" in (e.slide_path or "")], (
            entries
        )  # list() shows complete ones
        r = c.post(
            "/v1/ask", json={"slide": "slide_000.tif", "question": Q, "max_new_tokens": 2, "evidence": False}
        )
        assert r.status_code == 200, r.text


def test_client_gone_mid_stream_frees_the_slot(srv):
    """A long sampled answer is dropped after its first token: the one decode slot comes free (no 429)."""
    body = {"slide": "slide_000.tif", "question": Q, "max_new_tokens": 3000, "temperature": 5.0, "seed": 3,
            "evidence": False}  # fmt: skip
    with srv.client() as c:
        with c.stream("POST", "/v1/ask", json=body, headers={"Accept": "text/event-stream"}) as r:
            assert r.status_code == 200
            for event, _ in sse_events(r.iter_lines()):
                if event == "token":
                    break
            assert c.post("/v1/ask", json={**body, "max_new_tokens": 2}).status_code == 429
        srv.wait_idle()
        r = c.post(
            "/v1/ask", json={"slide": "slide_000.tif", "question": Q, "max_new_tokens": 2, "evidence": False}
        )
        assert r.status_code == 200, r.text
