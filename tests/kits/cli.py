"""The ``wsi-llava`` console script run as a user runs it (a fresh process), and the shape of its user errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_cli(
    *args: str, cache: Path, check: bool = True, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run the installed console script as a user would (a fresh process each time)."""
    full_env = {**os.environ, "WSI_LLAVA_CACHE": str(cache), "HF_HUB_OFFLINE": "1", **(env or {})}
    exe = Path(sys.executable).with_name("wsi-llava")
    out = subprocess.run([str(exe), *args], capture_output=True, text=True, env=full_env, timeout=600)
    if check and out.returncode != 0:
        raise AssertionError(f"wsi-llava {' '.join(args)} failed ({out.returncode}):\n{out.stderr}")
    return out


def assert_user_error(out: subprocess.CompletedProcess, *needles: str) -> None:
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith("Error:") or "\nError:" in out.stderr, out.stderr
    for n in needles:
        assert n in out.stderr, f"{n!r} not in {out.stderr!r}"
