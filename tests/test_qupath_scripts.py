"""The Groovy scripts for QuPath's script editor: the command line they build, and a run against stubs.

Without groovy: the flags each script passes to ``wsi-llava describe`` are read from its
``buildCommand`` and checked against the real click command. With Debian's groovy (apt-get install
groovy): each script runs against stub QuPath types (qupath_ext/testdouble/groovy) with a
``wsi-llava`` launcher that records its arguments and runs the real ``describe`` command.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from kits.qupath import TINY_MODEL

from wsi_llava.annotate import DESCRIPTION_KEY
from wsi_llava.describe import describe_command

ROOT = Path(__file__).resolve().parents[1]
#: the code the scripts share, loaded by each from beside its own file
COMMON = ROOT / "qupath_ext" / "scripts" / "wsi_llava_common.groovy"
#: the scripts that run `wsi-llava describe` here (describe_via_server.groovy: tests/test_serve_groovy.py)
SERVER_SCRIPT = ROOT / "qupath_ext" / "scripts" / "describe_via_server.groovy"
SCRIPTS = sorted(
    p for p in (ROOT / "qupath_ext" / "scripts").glob("*.groovy") if p not in (COMMON, SERVER_SCRIPT)
)
STUBS = ROOT / "qupath_ext" / "testdouble" / "groovy"
JAVA_HOME = "/usr/lib/jvm/java-17-openjdk-amd64"


def _build_command_body(text: str) -> str:
    m = re.search(r"List<String> buildCommand\((.*?)\n}\n", text, re.S)
    assert m, "buildCommand(...) not found"
    return m.group(1)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_builds_a_valid_describe_command_line(script: Path):
    """Parser-free: every flag the scripts pass exists on ``wsi-llava describe``; required ones are there."""
    own = script.read_text()
    assert f'"{COMMON.name}"' in own and "evaluate(common)" in own and "wsiLlava.describeSelected(" in own
    text = COMMON.read_text()
    assert "import static qupath.lib.gui.scripting.QPEx.*" in text  # no default imports in an evaluated file
    body = _build_command_body(text)
    literal = re.search(r"def cmd = \[(.*?)\]", body, re.S).group(1)
    parts = [p.strip() for p in literal.split(",")]
    assert parts[:2] == ["exe", '"describe"']
    flags = re.findall(r'"(-{1,2}[a-z][a-z-]*)"', body)
    known = {opt for p in describe_command.params for opt in p.opts + p.secondary_opts}
    assert set(flags) <= known, set(flags) - known
    required = {p.opts[-1] for p in describe_command.params if p.required}
    assert required <= set(flags) | {"--output"} and "-o" in flags
    # each value-taking flag is followed by a variable, not another flag
    for flag, value in zip(parts[2::2], parts[3::2], strict=False):
        assert flag.startswith('"-') and not value.startswith('"-'), (flag, value)
    # export, re-import through QuPath's reader, refresh, and a message when wsi-llava is missing
    assert "exportSelectedObjectsToGeoJson(" in text and '"FEATURE_COLLECTION"' in text
    assert "PathIO.readObjects(" in text and "fireHierarchyUpdate()" in text
    assert "wsi-llava is not installed" in text and "Dialogs.showErrorMessage" in text


def _state(tmp_path: Path, slide: Path) -> Path:
    box = {"type": "Polygon", "coordinates": [[[100, 100], [700, 100], [700, 700], [100, 700], [100, 100]]]}
    objs = [
        {
            "type": "Feature",
            "id": "00000000-0000-4000-8000-00000000000a",
            "geometry": box,
            "selected": True,
            "properties": {
                "objectType": "annotation",
                "name": "A",
                "metadata": {DESCRIPTION_KEY: "old note"},
                "measurements": {"Area": 3.0},
            },
        },
        {
            "type": "Feature",
            "id": "00000000-0000-4000-8000-00000000000b",
            "geometry": box,
            "selected": True,
            "properties": {"objectType": "annotation", "name": "B"},
        },
        {
            "type": "Feature",
            "id": "00000000-0000-4000-8000-00000000000c",
            "geometry": box,
            "selected": False,
            "properties": {"objectType": "annotation", "name": "C"},
        },
    ]
    p = tmp_path / "state.json"
    p.write_text(json.dumps({"uri": slide.as_uri(), "objects": objs}))
    return p


def _launcher(tmp_path: Path, fail: bool = False) -> Path:
    """A ``wsi-llava`` stand-in: records argv, then runs the real describe command (tiny model).

    With ``fail`` it exits 1 after recording, as ``wsi-llava`` does on bad input.
    """
    exe = tmp_path / ("bin-fail" if fail else "bin") / "wsi-llava"
    exe.parent.mkdir()
    tests = Path(__file__).resolve().parent
    exe.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        f"sys.path.insert(0, {str(tests)!r})\n"
        "open(os.environ['ARGV_LOG'], 'w').write(json.dumps(sys.argv[1:]))\n"
        + ("sys.exit('Error: the slide cannot be read')\n" if fail else "")
        + "from kits.qupath import TinyModelPlugin\n"
        "from wsi_llava import plugins\n"
        "plugins.register_plugin(TinyModelPlugin(), name='tiny')\n"
        "from wsi_llava.describe import describe_command\n"
        "args = sys.argv[2:]\n"
        f"args[args.index('--model') + 1] = {TINY_MODEL!r}\n"
        "describe_command.main(args + ['--max-new-tokens', '5'], prog_name='wsi-llava describe')\n"
    )
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


def _run_groovy(script: Path, state: Path, result: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["groovy", "-cp", str(STUBS), str(STUBS / "run_script.groovy"), str(script), str(state), str(result)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.mark.skipif(shutil.which("groovy") is None, reason="groovy not installed (apt-get install groovy)")
def test_scripts_run_against_stub_qupath(world, tmp_path, shared_cache):
    slide = world / "slides" / "slide_000.tif"
    exe = _launcher(tmp_path)
    env = {
        **os.environ,
        "JAVA_HOME": os.environ.get("JAVA_HOME", JAVA_HOME),
        "WSI_LLAVA": str(exe),
        "ARGV_LOG": str(tmp_path / "argv.json"),
        "FAKE_QUPATH_ANSWER": "Is it tumour?",
    }
    by_name = {s.name: s for s in SCRIPTS}
    state, result = _state(tmp_path, slide), tmp_path / "describe.json"
    proc = _run_groovy(by_name["describe_selected.groovy"], state, result, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(result.read_text())
    assert out["dialogs"] == ["info: WSI-LLaVA: answers written into 2 of 2 annotation(s)."], proc.stdout
    assert out["updates"] == 1
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv[:2] == ["describe", "--slide"] and argv[2] == str(slide) and "--name" in argv
    assert argv[argv.index("--question") + 1] == "Describe the tissue in this region."
    objs = {o["properties"]["name"] if o["id"].endswith("c") else o["id"][-1]: o for o in out["objects"]}
    assert objs["C"]["properties"] == {"objectType": "annotation", "name": "C"}  # not selected: untouched
    a = objs["a"]["properties"]
    assert a["metadata"][DESCRIPTION_KEY].startswith("old note\n\n--- WSI-LLaVA, ")
    assert a["measurements"]["Area"] == 3.0 and a["measurements"]["WSI-LLaVA tiles"] > 0
    assert objs["b"]["properties"]["metadata"][DESCRIPTION_KEY].strip()

    # the ask script: the typed question is passed on; wsi-llava failing leaves everything unchanged
    env_fail = {**env, "WSI_LLAVA": str(_launcher(tmp_path, fail=True))}
    state, result = _state(tmp_path, slide), tmp_path / "ask.json"
    proc = _run_groovy(by_name["ask_wsi_llava.groovy"], state, result, env_fail)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(result.read_text())
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv[argv.index("--question") + 1] == "Is it tumour?"
    assert out["dialogs"] == ["error: wsi-llava describe failed (exit code 1); see the log above."]
    assert "the slide cannot be read" in proc.stdout and out["updates"] == 0
    assert [o["properties"] for o in out["objects"]] == [
        o["properties"] for o in json.loads(state.read_text())["objects"]
    ]

    # a script without the shared file beside it: a message in QuPath, nothing changed
    alone = tmp_path / "alone" / "describe_selected.groovy"
    alone.parent.mkdir()
    shutil.copy(by_name["describe_selected.groovy"], alone)
    state, result = _state(tmp_path, slide), tmp_path / "alone.json"
    proc = _run_groovy(alone, state, result, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(result.read_text())
    assert out["dialogs"] == [
        "error: wsi_llava_common.groovy must be in the folder of this script; run the script from its file "
        "(File > Open in the script editor)."
    ]
    assert out["updates"] == 0

    # wsi-llava missing: a message in QuPath, nothing changed
    env_missing = {**env, "WSI_LLAVA": "", "PATH": "/usr/bin:/bin"}
    state, result = _state(tmp_path, slide), tmp_path / "missing.json"
    proc = _run_groovy(by_name["describe_selected.groovy"], state, result, env_missing)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(result.read_text())
    assert out["dialogs"][0].startswith("error: wsi-llava is not installed")
    assert out["updates"] == 0
    assert [o["properties"] for o in out["objects"]] == [
        o["properties"] for o in json.loads(state.read_text())["objects"]
    ]


@pytest.mark.skipif(shutil.which("groovy") is None, reason="groovy not installed (apt-get install groovy)")
def test_scripts_add_evidence_tiles_below_their_annotations(world, tmp_path, shared_cache):
    """EVIDENCE = true: ``--evidence`` is passed, and each annotation's tiles become its child detections,
    replacing its earlier evidence; other objects (a user's detection, an unselected annotation's tiles) stay."""
    from wsi_llava.evidence_tiles import EVIDENCE_CLASS, RELEVANCE_MEASUREMENT

    slide = world / "slides" / "slide_000.tif"

    def square(x0, y0, x1, y1):
        return {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}

    def obj(i, geometry, selected=False, parent=None, **props):
        return {"type": "Feature", "id": f"00000000-0000-4000-8000-{i:012d}", "geometry": geometry,
                "selected": selected, "parent": parent, "properties": props}  # fmt: skip

    a, b, c = (f"00000000-0000-4000-8000-{i:012d}" for i in (1, 2, 3))
    evidence = {"objectType": "detection", "classification": {"name": EVIDENCE_CLASS}}
    objs = [
        obj(1, square(100, 100, 700, 700), True, objectType="annotation", name="A"),
        obj(2, square(1000, 1000, 1600, 1600), True, objectType="annotation", name="B"),
        obj(3, square(1700, 100, 2000, 400), False, objectType="annotation", name="C"),
        obj(4, square(256, 256, 512, 512), parent=a, **evidence, measurements={RELEVANCE_MEASUREMENT: 1.0}),
        obj(
            5, square(300, 300, 310, 310), parent=a, objectType="detection", classification={"name": "Tumor"}
        ),
        obj(6, square(1792, 0, 2048, 256), parent=c, **evidence, measurements={RELEVANCE_MEASUREMENT: 1.0}),
    ]
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"uri": slide.as_uri(), "objects": objs}))
    script = tmp_path / "describe_selected.groovy"
    text = (ROOT / "qupath_ext" / "scripts" / "describe_selected.groovy").read_text()
    assert "boolean EVIDENCE = false" in text
    script.write_text(text.replace("boolean EVIDENCE = false", "boolean EVIDENCE = true"))
    shutil.copy(COMMON, tmp_path)  # the shared code, beside the script
    env = {
        **os.environ,
        "JAVA_HOME": os.environ.get("JAVA_HOME", JAVA_HOME),
        "WSI_LLAVA": str(_launcher(tmp_path)),
        "ARGV_LOG": str(tmp_path / "argv.json"),
    }
    result = tmp_path / "result.json"
    proc = _run_groovy(script, state, result, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "--evidence" in json.loads((tmp_path / "argv.json").read_text())
    out = json.loads(result.read_text())
    by_id = {o["id"]: o for o in out["objects"]}
    tiles = [
        o for o in out["objects"] if o["properties"].get("classification", {}).get("name") == EVIDENCE_CLASS
    ]
    mine = {p: [t for t in tiles if t["parent"] == p] for p in (a, b, c)}
    assert out["dialogs"] == [
        f"info: WSI-LLaVA: answers written into 2 of 2 annotation(s), {len(mine[a]) + len(mine[b])} evidence tile(s)."
    ]
    assert mine[a] and mine[b] and objs[3]["id"] not in by_id  # A's earlier tile replaced
    assert [t["id"] for t in mine[c]] == [objs[5]["id"]]  # C was not described: its tile stays
    assert by_id[objs[4]["id"]]["parent"] == a  # the user's own detection stays
    for parent, (x0, y0, x1, y1) in ((a, (100, 100, 700, 700)), (b, (1000, 1000, 1600, 1600))):
        for t in mine[parent]:
            ring = t["geometry"]["coordinates"][0]
            cx, cy = (ring[0][0] + ring[2][0]) / 2, (ring[0][1] + ring[2][1]) / 2
            assert x0 <= cx <= x1 and y0 <= cy <= y1 and t["properties"]["objectType"] == "detection"
            assert 0 < t["properties"]["measurements"][RELEVANCE_MEASUREMENT] <= 1
    assert out["updates"] == 1
