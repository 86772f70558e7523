"""``describe_via_server.groovy`` (QuPath without Python) against a real ``wsi-llava serve`` process.

Debian's groovy runs the script through the Groovy test double of QuPath (qupath_ext/testdouble/groovy),
as the script editor runs it; the script's settings are edited at the top, as a user does. The answers land
in the double's objects (dumped as QuPath's GeoJSON), written back as describe_selected.groovy writes them;
each failure (refused, 401, 403, 404) is one dialog and changes nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from kits.listeners import closed_port

from wsi_llava.annotate import DESCRIPTION_KEY

pytestmark = pytest.mark.skipif(
    shutil.which("groovy") is None, reason="groovy not installed (apt-get install groovy)"
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "qupath_ext" / "scripts"
STUBS = ROOT / "qupath_ext" / "testdouble" / "groovy"
JAVA_HOME = "/usr/lib/jvm/java-17-openjdk-amd64"
BOX = {"type": "Polygon", "coordinates": [[[100, 100], [700, 100], [700, 700], [100, 700], [100, 100]]]}


@pytest.fixture(scope="module")
def served(world, tmp_path_factory):
    from kits.serve import running_server

    tmp = tmp_path_factory.mktemp("serve_groovy")
    with running_server(tmp, [world / "slides" / "slide_000.tif"], token=True) as server:
        yield server, tmp / "token"


def _script(folder: Path, **settings: str) -> Path:
    """describe_via_server.groovy (and the shared file beside it) with ``settings`` edited at the top."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(SCRIPTS / "wsi_llava_common.groovy", folder)
    text = (SCRIPTS / "describe_via_server.groovy").read_text()
    for name, value in settings.items():
        text, n = re.subn(
            rf"^(\w+ {name} = ).*$", lambda m, v=value: m.group(1) + v, text, count=1, flags=re.M
        )
        assert n == 1, name
    script = folder / "describe_via_server.groovy"
    script.write_text(text)
    return script


def _state(path: Path, slide: Path) -> Path:
    def ann(suffix: str, name: str, selected: bool, **props) -> dict:
        return {"type": "Feature", "id": f"00000000-0000-4000-8000-00000000000{suffix}", "geometry": BOX,
                "selected": selected, "properties": {"objectType": "annotation", "name": name, **props}}  # fmt: skip

    objs = [
        ann("a", "A", True, metadata={DESCRIPTION_KEY: "old note"}, measurements={"Area": 3.0}),
        ann("b", "B", True),
        ann("c", "C", False),
    ]
    path.write_text(json.dumps({"uri": slide.as_uri(), "objects": objs}))
    return path


def _run(script: Path, state: Path, env: dict[str, str]) -> dict:
    result = state.with_suffix(".out.json")
    full = {k: v for k, v in os.environ.items() if not k.startswith("WSI_LLAVA_")}
    full.update({"JAVA_HOME": os.environ.get("JAVA_HOME", JAVA_HOME), **env})
    proc = subprocess.run(
        ["groovy", "-cp", str(STUBS), str(STUBS / "run_script.groovy"), str(script), str(state), str(result)],
        env=full, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(result.read_text())


def test_describe_via_server_writes_answers_back(served, tmp_path):
    server, token_file = served
    slide = server.root / "slide_000.tif"
    script = _script(tmp_path / "scripts", MAX_NEW_TOKENS="3", EVIDENCE="true", SET_NAME="true")
    env = {"WSI_LLAVA_SERVER": server.url, "WSI_LLAVA_TOKEN_FILE": str(token_file)}
    state = _state(tmp_path / "state.json", slide)
    out = _run(script, state, env)
    assert out["dialogs"][0].startswith("info: WSI-LLaVA: answers written into 2 of 2 annotation(s), "), out
    assert out["updates"] == 1
    objs = {o["id"][-1]: o for o in out["objects"] if o["properties"].get("objectType") == "annotation"}
    assert objs["c"]["properties"] == {"objectType": "annotation", "name": "C"}  # not selected: untouched
    a = objs["a"]["properties"]
    assert a["metadata"][DESCRIPTION_KEY].startswith("old note\n\n--- WSI-LLaVA, ")
    assert "Describe the tissue in this region." in a["metadata"][DESCRIPTION_KEY]
    assert a["measurements"]["Area"] == 3.0 and a["measurements"]["WSI-LLaVA tiles"] > 0
    assert (
        objs["b"]["properties"]["metadata"][DESCRIPTION_KEY].strip()
        and objs["b"]["properties"]["name"] != "B"
    )
    tiles = [o for o in out["objects"] if o["properties"].get("objectType") == "detection"]
    n = int(re.search(r", (\d+) evidence tile", out["dialogs"][0]).group(1))
    assert n == len(tiles) > 0 and {t["parent"] for t in tiles} <= {objs["a"]["id"], objs["b"]["id"]}
    assert all(t["properties"]["classification"]["name"] == "WSI-LLaVA evidence" for t in tiles)

    # the slide relative to where this computer sees the server's root gives the same slide name
    rel = _script(tmp_path / "rel", MAX_NEW_TOKENS="2")
    out = _run(rel, _state(tmp_path / "rel.json", slide), {**env, "WSI_LLAVA_SLIDES_ROOT": str(server.root)})
    assert out["dialogs"] == ["info: WSI-LLaVA: answers written into 2 of 2 annotation(s)."], out


def test_describe_via_server_names_each_failure(served, tmp_path):
    server, token_file = served
    slide = server.root / "slide_000.tif"
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-token\n")
    outside = tmp_path / "elsewhere.tif"
    shutil.copyfile(slide, outside)
    script = _script(tmp_path / "scripts", MAX_NEW_TOKENS="2")
    missing = _script(tmp_path / "missing", MAX_NEW_TOKENS="2", SLIDE='"no_such_slide.tif"')
    ok = {"WSI_LLAVA_SERVER": server.url, "WSI_LLAVA_TOKEN_FILE": str(token_file)}
    cases = [
        (script, slide, {"WSI_LLAVA_SERVER": f"http://127.0.0.1:{closed_port()}"}, "connection refused"),
        (script, slide, {"WSI_LLAVA_SERVER": server.url}, "401 unauthorized"),
        (script, slide, {**ok, "WSI_LLAVA_TOKEN_FILE": str(wrong)}, "403 forbidden"),
        (script, outside, ok, "403 forbidden"),
        (missing, slide, ok, "404 not found"),
    ]
    for i, (path, image, env, words) in enumerate(cases):
        state = _state(tmp_path / f"state{i}.json", image)
        out = _run(path, state, env)
        assert len(out["dialogs"]) == 1 and out["dialogs"][0].startswith("error: "), out["dialogs"]
        assert words in out["dialogs"][0], out["dialogs"]
        assert out["updates"] == 0
        before = [o["properties"] for o in json.loads(state.read_text())["objects"]]
        assert [o["properties"] for o in out["objects"]] == before
