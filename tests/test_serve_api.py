"""``wsi-llava serve`` answers as the offline commands do: a real server process on 127.0.0.1, the demo model on
CPU, synthetic slides; every answer compared with the same question asked in-process through ``SlideSession``."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import httpx
import pytest
from kits.serve import running_server, sse_events

from wsi_llava import __version__
from wsi_llava.answer import Answer
from wsi_llava.serve.schemas import VERSION_HEADER, DescribeResult, Health, ModelList

Q = "What is the diagnosis?"
TOKENS = 6


@pytest.fixture(scope="module")
def srv(world, tmp_path_factory):
    slides = sorted((world / "slides").glob("*.tif"))
    with running_server(tmp_path_factory.mktemp("serve-api"), slides) as s:
        yield s


@pytest.fixture(scope="module")
def model():
    from wsi_llava.model import load_model

    return load_model("demo", device="cpu")


def offline(model, slide: Path, question: str, region=None, **kw) -> Answer:
    from wsi_llava.session import SlideSession

    with SlideSession(slide, model, device="cpu") as s:
        return s.ask(question, region, **kw)


def same(a: Answer, b: Answer) -> None:
    assert a.model_dump(exclude={"timings"}) == b.model_dump(exclude={"timings"})


def test_health_models_and_version_header(srv):
    r = httpx.get(f"{srv.url}/v1/health")
    assert r.status_code == 200 and r.headers[VERSION_HEADER] == __version__
    h = Health.model_validate(r.json())
    assert h.status == "ok" and h.models == ["demo"] and h.auth is False and h.queue.capacity == 64
    r = httpx.get(f"{srv.url}/v1/models")
    models = ModelList.model_validate(r.json()).models
    assert [(m.name, m.default, m.demo) for m in models] == [("demo", True, True)]
    assert httpx.get(f"{srv.url}/docs").status_code == 200
    r = httpx.get(f"{srv.url}/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert r.headers[VERSION_HEADER] == __version__


def test_ask_json_equals_session(srv, model):
    body = {"slide": "slide_000.tif", "question": Q, "max_new_tokens": TOKENS}
    r = httpx.post(f"{srv.url}/v1/ask", json=body, timeout=120)
    assert r.status_code == 200, r.text
    got = Answer.model_validate(r.json())
    want = offline(model, srv.root / "slide_000.tif", Q, max_new_tokens=TOKENS)
    assert got.evidence.scores and got.answer
    same(got, want)


def test_ask_stream_rectangle_and_geometry(srv, model):
    from wsi_llava.slide.region import Region

    rect = {"x": 200, "y": 300, "width": 1200, "height": 900}
    body = {
        "slide": "slide_001.tif",
        "question": Q,
        "max_new_tokens": TOKENS,
        "rectangle": rect,
        "evidence": False,
    }
    with httpx.stream(
        "POST", f"{srv.url}/v1/ask", json=body, headers={"Accept": "text/event-stream"}, timeout=120
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r.iter_lines()))
    names = [e for e, _ in events]
    assert names[-1] == "answer" and "token" in names
    assert names.index("token") > max((i for i, n in enumerate(names) if n == "progress"), default=-1)
    got = Answer.model_validate_json(events[-1][1])
    tokens = "".join(json.loads(d)["text"] for e, d in events if e == "token")
    assert tokens.strip() == got.answer
    region = Region.rectangle(200, 300, 1200, 900, source="rectangle")
    same(got, offline(model, srv.root / "slide_001.tif", Q, region, max_new_tokens=TOKENS, evidence=False))

    # the same rectangle as a GeoJSON geometry (as QuPath sends it) selects the same tiles
    geometry = {
        "type": "Polygon",
        "coordinates": [[[200, 300], [1400, 300], [1400, 1200], [200, 1200], [200, 300]]],
    }
    body = {
        "slide": "slide_001.tif",
        "question": Q,
        "max_new_tokens": TOKENS,
        "geometry": geometry,
        "evidence": False,
    }
    r = httpx.post(f"{srv.url}/v1/ask", json=body, timeout=120)
    assert r.status_code == 200, r.text
    by_geometry = Answer.model_validate(r.json())
    assert by_geometry.answer == got.answer
    assert by_geometry.region is not None and by_geometry.scope == "region"


def test_ask_errors_are_error_bodies(srv):
    cases = [
        ({"slide": "slide_000.tif"}, 422, "question"),
        ({"slide": "slide_000.tif", "question": Q, "max_new_tokens": 0}, 422, "max_new_tokens"),
        (
            {
                "slide": "slide_000.tif",
                "question": Q,
                "rectangle": {"x": 0, "y": 0, "width": 5, "height": 5},
                "geometry": {"type": "Polygon", "coordinates": []},
            },
            422,
            "at most one",
        ),
        ({"slide": "slide_000.tif", "question": Q, "colour": "red"}, 422, "colour"),  # requests stay strict
        (
            {
                "slide": "slide_000.tif",
                "question": Q,
                "rectangle": {"x": 0, "y": 0, "width": 5, "height": 5, "depth": 1},
            },
            422,
            "rectangle.depth",
        ),  # fmt: skip
        ({"slide": "nope.tif", "question": Q}, 404, "nope.tif"),
        ({"slide": "slide_000.tif", "question": Q, "model": "other"}, 404, "other"),
        (
            {"slide": "slide_000.tif", "question": Q, "geometry": {"type": "Point", "coordinates": [1, 2]}},
            400,
            "geometry",
        ),
        (
            {
                "slide": "slide_000.tif",
                "question": Q,
                "rectangle": {"x": 90000, "y": 0, "width": 50, "height": 50},
            },
            400,
            "outside",
        ),
    ]
    for body, status, needle in cases:
        r = httpx.post(f"{srv.url}/v1/ask", json=body, timeout=60)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert needle in err["message"], err
        assert "Traceback" not in r.text
    r = httpx.post(f"{srv.url}/v1/ask", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid"


def _qupath_collection(world: Path) -> dict:
    """A QuPath-style export: two of the slide's annotations with QuPath's properties, a point, a detection."""
    data = json.loads((world / "annotations" / "slide_000.geojson").read_text())
    feats = data["features"][:2]
    for i, f in enumerate(feats):
        f["properties"] = {
            "objectType": "annotation",
            "name": f"Region {i}",
            "classification": {"name": "Tumor", "color": [200, 0, 0]},
            "isLocked": False,
            "measurements": {"Area µm^2": 1234.5},
        }
    point = {
        "type": "Feature",
        "geometry": {"type": "Point", "coordinates": [10, 10]},
        "properties": {"objectType": "annotation"},
    }
    detection = copy.deepcopy(feats[0])
    detection["id"] = "det-1"
    detection["properties"] = {"objectType": "detection"}
    return {"type": "FeatureCollection", "bbox": [0, 0, 2048, 2048], "features": [*feats, point, detection]}


def _without_detection_ids(doc: dict) -> dict:
    """``doc`` with the random ids of its evidence detections dropped (each run draws new ones)."""
    doc = copy.deepcopy(doc)
    for f in doc["features"]:
        if f.get("properties", {}).get("classification", {}).get("name") == "WSI-LLaVA evidence":
            f.pop("id", None)
    return doc


def test_describe_equals_offline_describe(srv, model, world, tmp_path):
    from wsi_llava.describe import describe_geojson
    from wsi_llava.evidence_tiles import EvidenceSelection
    from wsi_llava.session import SlideSession

    collection = _qupath_collection(world)
    body = {
        "slide": "slide_000.tif",
        "features": collection,
        "max_new_tokens": TOKENS,
        "set_name": True,
        "evidence": {"mass": 0.5, "max_tiles": 3},
    }
    r = httpx.post(f"{srv.url}/v1/describe", json=body, timeout=300)
    assert r.status_code == 200, r.text
    got = DescribeResult.model_validate(r.json())

    src, out = tmp_path / "export.geojson", tmp_path / "described.geojson"
    src.write_text(json.dumps(collection))
    with SlideSession(srv.root / "slide_000.tif", model, device="cpu") as session:
        report = describe_geojson(
            session,
            src,
            out,
            set_name=True,
            max_new_tokens=TOKENS,
            evidence=EvidenceSelection(mass=0.5, max_tiles=3),
        )
    assert _without_detection_ids(got.features) == _without_detection_ids(json.loads(out.read_text()))
    assert got.described == report.n_ok == 2 and got.evidence_added == report.evidence_added > 0
    assert [o.answer.answer for o in got.results] == [r.answer.answer for r in report.results]
    assert got.features["features"][2] == collection["features"][2]  # the point, untouched
    assert got.features["bbox"] == collection["bbox"]
    assert got.notice and "demo" in got.notice

    # streamed, no evidence detections asked for: progress, one result per annotation, then the collection,
    # the same as the offline command writes without --evidence (whose answers still count their tiles)
    one = {**collection, "features": collection["features"][1:2]}
    with httpx.stream(
        "POST",
        f"{srv.url}/v1/describe",
        json={**body, "features": one, "evidence": None},
        headers={"Accept": "text/event-stream"},
        timeout=300,
    ) as r:
        assert r.status_code == 200
        events = list(sse_events(r.iter_lines()))
    assert [e for e, _ in events if e != "progress"] == ["result", "describe"]
    streamed = DescribeResult.model_validate_json(events[-1][1])
    assert streamed.evidence_added == 0 and len(streamed.features["features"]) == 1
    (feature,) = streamed.features["features"]
    assert feature == json.loads(out.read_text())["features"][1]  # as the offline command described it
    assert feature["properties"]["measurements"]["WSI-LLaVA tiles"] > 0
    assert streamed.results[0].answer.answer == got.results[1].answer.answer
