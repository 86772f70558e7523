"""The client of ``wsi-llava serve``: named failures over real sockets, and the CLI and QuPath bridge asking a
real server process (``kits.serve``) about a real synthetic slide with the demo model.

One server per module (token required, a 3 MB upload limit); answers are a few tokens; evidence only where
a test reads it.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from kits.listeners import canned_http, closed_port, silent_listener, tls_listener
from kits.serve import own_cache

from wsi_llava.annotate import DESCRIPTION_KEY
from wsi_llava.answer import Answer
from wsi_llava.cli import cli
from wsi_llava.errors import WsiLlavaError
from wsi_llava.serve import client as sc
from wsi_llava.serve.schemas import AskRequest, ExtractRequest

QUESTION = "Is there tumour on this slide?"
FEW = ["--max-new-tokens", "3"]


def _health(api: str = "v1") -> dict:
    queue = {"running": 0, "queued": 0, "capacity": 8}
    return {"status": "ok", "version": "9.9", "api": api, "models": ["demo"], "workers": 1, "auth": False,
            "queue": queue}  # fmt: skip


def _error(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def _fails(url: str, exc: type[Exception], *words: str, **kw) -> str:
    with sc.ServerClient(url, **kw) as client, pytest.raises(exc) as info:
        client.health()
    message = str(info.value)
    assert url in message and all(w in message for w in words), message
    return message


# --- failures named, over real sockets ------------------------------------------------------------------
def test_network_failures_are_named(tmp_path):
    port = closed_port()
    _fails(
        f"http://127.0.0.1:{port}",
        sc.ConnectionRefused,
        "connection refused",
        f"port {port}",
        "wsi-llava serve",
    )
    _fails("http://no-such-host.invalid:8765", sc.NameNotResolved, "'no-such-host.invalid' does not resolve")
    with silent_listener() as port:
        _fails(f"http://127.0.0.1:{port}", sc.ServerTimeout, "longer than 1 s to reply", timeout=1.0)
    with tls_listener(tmp_path) as url:
        _fails(url, sc.TLSFailed, "certificate is not trusted", "self-signed")


def test_replies_that_are_not_the_api_or_refuse_are_named():
    page = "<html><body><h1>502 Bad Gateway</h1>nginx</body></html>"
    with canned_http(502, page, "text/html") as url:
        _fails(url, sc.BadReply, "HTTP 502", "an HTML page", "proxy")
    with canned_http(200, page, "text/html") as url:  # a login page answering 200
        _fails(url, sc.BadReply, "an HTML page, not the wsi-llava API's JSON")
    with canned_http(200, _health("v2")) as url:
        _fails(url, sc.VersionMismatch, "API v2", "this client v1", "same major version")
    with canned_http(200, {"hello": "world"}) as url:
        _fails(url, sc.BadReply, "not a Health of API v1")
    busy = _error("busy", "the queue is full (8 waiting)")
    with canned_http(429, busy, headers={"Retry-After": "7"}) as url:
        with sc.ServerClient(url) as client, pytest.raises(sc.Busy) as info:
            client.models()
        assert (
            info.value.retry_after == 7 and "queue is full" in str(info.value) and "in 7 s" in str(info.value)
        )
    with canned_http(503, _error("draining", "shutting down")) as url:
        _fails(url, sc.Draining, "503", "draining", "shutting down")


def test_urls_and_token_files(tmp_path, monkeypatch, caplog):
    for bad in ("localhost:8765", "ftp://host", "http://", "http://host:port"):
        with pytest.raises(sc.ServerError, match="--server"):
            sc.ServerClient(bad)
    assert sc.ServerClient("http://h:1/v1/").url == "http://h:1"
    with pytest.raises(WsiLlavaError, match=r"--token-file .*missing.*cannot read"):
        sc.read_token(tmp_path / "missing")
    (tmp_path / "empty").write_text("\n \n")
    with pytest.raises(WsiLlavaError, match="the file is empty"):
        sc.read_token(tmp_path / "empty")
    (tmp_path / "tok").write_text("s3cret-token\n")
    assert sc.read_token(tmp_path / "tok") == "s3cret-token"
    monkeypatch.setenv(sc.TOKEN_ENV, " from-env ")
    assert sc.read_token(None) == "from-env"
    caplog.set_level(logging.DEBUG)
    client = sc.ServerClient(f"http://127.0.0.1:{closed_port()}", "s3cret-token")
    with pytest.raises(sc.ConnectionRefused) as info:
        client.health()
    assert "s3cret" not in repr(client) + str(info.value) + caplog.text

    # the CLI: one line, no traceback, exit 1; local-only options refused with --server
    r = CliRunner().invoke(cli, ["ask", "s.tif", QUESTION, "--server", f"http://127.0.0.1:{closed_port()}"])
    assert r.exit_code == 1 and "Error:" in r.output and "connection refused" in r.output
    assert "Traceback" not in r.output
    r = CliRunner().invoke(cli, ["ask", "s.tif", QUESTION, "--server", "http://h:1", "--device", "cpu"])
    assert r.exit_code == 2 and "--device: set on the server" in r.output
    r = CliRunner().invoke(cli, ["ask", "s.tif", QUESTION, "--upload"])
    assert r.exit_code == 2 and "--upload and --token-file go with --server" in r.output


# --- against a real server ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(world, tmp_path_factory):
    from kits.serve import running_server

    tmp = tmp_path_factory.mktemp("serve_client")
    slide = world / "slides" / "slide_000.tif"
    with running_server(tmp, [slide], token=True, args=["--max-upload-mb", "3"]) as server:
        token_file = tmp / "token"
        yield server, token_file


def _cli(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_auth_paths_and_limits_are_named(served, tmp_path):
    server, token_file = served
    with sc.ServerClient(server.url) as anonymous:
        health = anonymous.health()  # no token needed
        assert health.auth and health.api == "v1" and "demo" in health.models
        with pytest.raises(sc.Unauthorized, match="401 unauthorized.*--token-file"):
            anonymous.models()
    with (
        sc.ServerClient(server.url, "wrong-token") as wrong,
        pytest.raises(sc.Forbidden, match="403 forbidden"),
    ):
        wrong.models()
    _fails(server.url.replace("http://", "https://"), sc.TLSFailed, "handshake failed", "try http://")
    client = sc.ServerClient(server.url, server.token)
    assert [m.name for m in client.models().models] == health.models
    outside = AskRequest(slide="../../etc/passwd", question=QUESTION, max_new_tokens=2, evidence=False)
    with pytest.raises(sc.Forbidden) as info:
        client.ask(outside)
    assert "403 forbidden" in str(info.value) and "outside" in str(info.value), info.value
    with pytest.raises(sc.NotFound, match="404"):
        client.ask(AskRequest(slide="no_such_slide.tif", question=QUESTION, max_new_tokens=2, evidence=False))
    big = tmp_path / "big.tif"
    big.write_bytes(b"\0" * (4 << 20))
    with pytest.raises(sc.TooLarge, match="413"):
        client.upload(big)
    client.close()

    r = _cli(
        "ask", "no_such_slide.tif", QUESTION, "--server", server.url, "--token-file", str(token_file), *FEW
    )
    assert r.exit_code == 1 and "404" in r.output and "no_such_slide.tif" in r.output


def test_cli_ask_streams_and_prints_the_same_json(served, world, tmp_path):
    server, token_file = served
    remote = ["--server", server.url, "--token-file", str(token_file)]
    region = ["--region", "256,256,768,768"]  # a few tiles: each answer's evidence pass is short
    r = _cli("ask", "slide_000.tif", QUESTION, *remote, *region, *FEW)
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() and "demo" in r.stderr  # the streamed text, then the demo notice

    r = _cli("ask", "slide_000.tif", QUESTION, *remote, *region, "--json", *FEW)
    assert r.exit_code == 0, r.output
    answer = Answer.model_validate_json(r.stdout)
    assert answer.scope == "region" and answer.region is not None and answer.evidence.scores
    assert answer.region.bounds == (256, 256, 1024, 1024)
    local = _cli("ask", str(world / "slides" / "slide_000.tif"), QUESTION, *region, "--json", *FEW,
                 "--cache", str(own_cache(tmp_path / "cache")))  # fmt: skip
    assert local.exit_code == 0, local.output
    here = Answer.model_validate_json(local.stdout)
    assert answer.answer == here.answer and answer.model == here.model and answer.question == here.question
    assert set(Answer.model_fields) == set(json.loads(r.stdout))

    # a slide the server cannot see: --upload sends it (twice costs nothing); --evidence-png reads it here
    other = tmp_path / "elsewhere" / "mine.tif"
    other.parent.mkdir()
    shutil.copyfile(world / "slides" / "slide_001.tif", other)
    r = _cli("ask", str(other), QUESTION, *remote, *FEW)
    assert r.exit_code == 1 and "403" in r.output
    png = tmp_path / "evidence.png"
    r = _cli("ask", str(other), QUESTION, *remote, *region, "--upload", "--evidence-png", str(png), *FEW)
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with sc.ServerClient(server.url, server.token) as client:
        again = client.upload(other)
        assert again.existing and again.slide.startswith("upload:")
        r = _cli("ask", again.slide, QUESTION, *remote, *region, *FEW)  # the upload name works as a slide
        assert r.exit_code == 0, r.output


def test_cli_describe_writes_the_offline_output(served, world, tmp_path):
    server, token_file = served
    box = [[[200, 200], [900, 200], [900, 900], [200, 900], [200, 200]]]
    features = [  # one annotation (each costs an evidence pass here and offline) and a point passed through
        {"type": "Feature", "id": "id-0", "geometry": {"type": "Polygon", "coordinates": box},
         "properties": {"objectType": "annotation", "name": "A", "measurements": {"Area": 1.5}}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 5]}, "properties": {}},
    ]  # fmt: skip
    inp = tmp_path / "in.geojson"
    inp.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    out, offline = tmp_path / "served.geojson", tmp_path / "offline.geojson"
    common = [
        "--geojson",
        str(inp),
        "--question",
        "Describe this.",
        "--evidence",
        "--evidence-tiles",
        "4",
        *FEW,
    ]
    r = _cli("describe", "--slide", "slide_000.tif", "-o", str(out), *common, "--server", server.url,
             "--token-file", str(token_file))  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "described 1 of 1 annotations" in r.output and "A: " in r.output
    r = _cli("describe", "--slide", str(world / "slides" / "slide_000.tif"), "-o", str(offline), *common,
             "--cache", str(own_cache(tmp_path / "cache")))  # fmt: skip
    assert r.exit_code == 0, r.output
    got, want = (_without_detection_ids(json.loads(p.read_text())) for p in (out, offline))
    assert got == want  # descriptions, measurements and the evidence detections alike (each has a fresh id)
    assert sum(f["properties"].get("objectType") == "detection" for f in got["features"]) > 0
    a = got["features"][0]["properties"]
    assert a["metadata"][DESCRIPTION_KEY].strip() and a["measurements"]["Area"] == 1.5

    # a failure writes nothing
    missing = tmp_path / "never.geojson"
    r = _cli("describe", "--slide", "gone.tif", "-o", str(missing), *common, "--server", server.url,
             "--token-file", str(token_file))  # fmt: skip
    assert r.exit_code == 1 and "404" in r.output and not missing.exists()


def _without_detection_ids(doc: dict) -> dict:
    for f in doc["features"]:
        if f["properties"].get("objectType") == "detection":
            f.pop("id", None)
    return doc


def test_replies_with_fields_this_client_does_not_know_are_read(served):
    """A newer server may add reply fields, at any depth: the client ignores them (requests stay strict)."""
    server, _ = served
    with sc.ServerClient(server.url, server.token) as client:
        answer = client.ask(
            AskRequest(slide="slide_000.tif", question=QUESTION, max_new_tokens=2, evidence=False)
        )
    partial = {"id": "j1", "kind": "extract", "state": "done"}
    with (
        canned_http(200, partial) as url,
        sc.ServerClient(url) as c,
        pytest.raises(sc.BadReply, match="slide"),
    ):
        c.job("j1")  # the fields a reply must have are still required
    newer = answer.model_dump(mode="json")
    newer["confidence"] = 0.5
    newer["evidence"]["heat"] = [1, 2]
    outcome = {"index": 0, "label": "A", "answer": newer, "reviewed": True}
    result = {"features": {"type": "FeatureCollection", "features": []}, "results": [outcome], "described": 1,
              "elapsed": 3.0}  # fmt: skip
    job = {"id": "j1", "kind": "describe", "state": "done", "slide": "s.tif", "model": "demo",
           "result": result, "progress": {"done": 1, "total": 1, "message": "", "eta": 2}, "owner": "x"}  # fmt: skip
    with canned_http(200, job) as url, sc.ServerClient(url) as client:
        got = client.job("j1")
    assert got.result is not None and got.result.results[0].answer == answer
    health = {**_health(), "gpu": "H100", "queue": {**_health()["queue"], "oldest_s": 1.5}}
    with canned_http(200, health) as url, sc.ServerClient(url) as client:
        assert client.health().queue.capacity == 8
    gone = {"error": {"code": "not_found", "message": "no job j9", "hint": "x"}}
    with (
        canned_http(404, gone) as url,
        sc.ServerClient(url) as c,
        pytest.raises(sc.NotFound, match="no job j9"),
    ):
        c.job("j9")


def test_extract_job_and_cancel(served):
    server, _ = served
    with sc.ServerClient(server.url, server.token) as client:
        job = client.extract(ExtractRequest(slide="slide_000.tif"))
        assert job.kind == "extract"
        done = client.wait(job.id, poll=0.2)
        assert done.state == "done"
        with pytest.raises(sc.NotFound, match="404"):
            client.job("no-such-job")


def test_qupath_bridge_answers_on_the_server(served, fake_qupath, world):
    from kits.qupath import FakeQuPath  # noqa: F401 - the fixture's type

    from wsi_llava_qupath.commands import qupath

    server, token_file = served
    fq = fake_qupath
    slide = server.root / "slide_000.tif"  # QuPath opened the file the server serves
    fq.open_image(slide.as_uri(), _png(world, slide.parent.parent), 2048, 2048, 0.5)
    box = [[[100, 100], [700, 100], [700, 700], [100, 700], [100, 100]]]
    for name, selected in (("sel", True), ("other", False)):
        fq.add_object({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": box},
                       "properties": {"objectType": "annotation", "name": name}}, selected=selected)  # fmt: skip
    remote = ["--server", server.url, "--token-file", str(token_file), "--port", str(fq.port)]
    r = CliRunner().invoke(
        qupath, ["describe", "--selected", "--name", *FEW, *remote], catch_exceptions=False
    )
    assert r.exit_code == 0, r.output
    assert "answered 1 annotation(s)" in r.output
    objs = {f["properties"].get("name"): f for f in fq.objects()}
    assert "other" in objs and DESCRIPTION_KEY not in (objs["other"]["properties"].get("metadata") or {})
    (described,) = [f for n, f in objs.items() if n != "other"]
    assert described["properties"]["metadata"][DESCRIPTION_KEY].strip()
    assert described["properties"]["measurements"]["WSI-LLaVA tiles"] > 0

    r = CliRunner().invoke(qupath, ["ask", QUESTION, "--whole-slide", *FEW, *remote], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "whole-image annotation" in r.output

    wrong = tmp = server.root.parent / "wrong-token"
    tmp.write_text("not-the-token\n")
    bad = ["--server", server.url, "--token-file", str(wrong), "--port", str(fq.port)]
    r = CliRunner().invoke(qupath, ["describe", "--selected", *FEW, *bad])
    assert r.exit_code == 1 and "403 forbidden" in r.output and "Traceback" not in r.output


def _png(world: Path, folder: Path) -> Path:
    """Level 0 of the world's slide_000 as a PNG (the pixels the QuPath double serves)."""
    from PIL import Image

    from wsi_llava.slide import open_slide

    png = folder / "slide_000.png"
    if not png.exists():
        with open_slide(world / "slides" / "slide_000.tif") as r:
            Image.fromarray(r.read_region((0, 0), 0, r.dimensions)).save(png)
    return png
