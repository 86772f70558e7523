"""Compiled artifacts persist across processes: torch.compile's caches live under our cache folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from wsi_llava import compile_cache

#: one fresh process: a FastTileEncoder compiled at its first batch (inductor's CPU code), then its counters
CHILD = r"""
import json, os
import torch
from torch._dynamo.utils import counters
from wsi_llava.features.fast import FastTileEncoder
from wsi_llava.features.tile import TileEncoder


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = torch.nn.AdaptiveAvgPool2d(2)
        self.blocks = torch.nn.Sequential(
            *[torch.nn.Sequential(torch.nn.Linear(12, 12), torch.nn.GELU()) for _ in range(2)]
        )

    def forward(self, x):
        return self.blocks(self.pool(x).flatten(1))


torch.manual_seed(0)
enc = TileEncoder("tiny", Tiny(), embed_dim=12, input_size=16, encoder_id="tiny:seed0", trained=False)
fast = FastTileEncoder(enc, "cpu", compile=True)
with torch.inference_mode():
    out = fast(torch.zeros((2, 16, 16, 3), dtype=torch.uint8))
print(json.dumps({
    "cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
    "compiled": fast.compiled,
    "shape": list(out.shape),
    "inductor": dict(counters["inductor"]),
    "aot_autograd": dict(counters["aot_autograd"]),
}))
"""


def _cpp_compiler() -> str | None:
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return get_cpp_compiler()
    except Exception:  # noqa: BLE001 - any failure to find one: inductor cannot build CPU code here
        return None


def _fresh_process(cache: Path, tmp: Path) -> dict:
    """Run CHILD in a new interpreter with its own, empty temporary folder (torch's default cache lives there)."""
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    # one compile thread, no precompiled C++ header (built per TMPDIR, it costs more than this tiny kernel)
    env.update(
        WSI_LLAVA_CACHE=str(cache),
        TMPDIR=str(tmp),
        TORCHINDUCTOR_COMPILE_THREADS="1",
        TORCHINDUCTOR_CPP_CACHE_PRECOMPILE_HEADERS="0",
    )
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_second_process_loads_what_the_first_compiled(tmp_path):
    if _cpp_compiler() is None:
        pytest.skip("no C++ compiler for inductor's CPU code generation on this machine")
    cache = tmp_path / "cache"
    first = _fresh_process(cache, tmp_path / "tmp1")
    second = _fresh_process(cache, tmp_path / "tmp2")
    ours = str((cache / compile_cache.SUBDIR).resolve())
    for run in (first, second):
        assert run["compiled"] and run["shape"] == [2, 12]
        assert run["cache_dir"] == ours
    assert first["inductor"].get("fxgraph_cache_miss", 0) >= 1
    assert first["inductor"].get("fxgraph_cache_hit", 0) == 0
    assert second["inductor"].get("fxgraph_cache_hit", 0) >= 1, second
    assert second["inductor"].get("fxgraph_cache_miss", 0) == 0, second
    assert second["aot_autograd"].get("autograd_cache_hit", 0) >= 1, second
    assert any((cache / compile_cache.SUBDIR / "fxgraph").rglob("*")), "no FX graph entries in our folder"
    assert not any(tmp_path.glob("tmp*/torchinductor_*/fxgraph")), "artifacts went to torch's tmp default"


def test_a_users_own_folder_is_kept(tmp_path, monkeypatch):
    own = tmp_path / "mine"
    monkeypatch.setenv(compile_cache.ENV_VAR, str(own))
    monkeypatch.setenv("WSI_LLAVA_CACHE", str(tmp_path / "cache"))
    assert compile_cache.configure() == own
    assert os.environ[compile_cache.ENV_VAR] == str(own)
    assert not (tmp_path / "cache").exists()


def test_torchs_default_counts_as_unset(tmp_path, monkeypatch):
    """Importing torch._dynamo writes torch's default into the environment: that is not the user's choice."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv(compile_cache.ENV_VAR, default_cache_dir())
    monkeypatch.setenv("WSI_LLAVA_CACHE", str(tmp_path / "cache"))
    got = compile_cache.configure()
    assert got == (tmp_path / "cache" / compile_cache.SUBDIR).resolve() and got.is_dir()
    assert os.environ[compile_cache.ENV_VAR] == str(got)
    assert compile_cache.configure(tmp_path / "other") == got  # the first call decides for the process


def test_an_unwritable_cache_folder_leaves_torchs_default(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.delenv(compile_cache.ENV_VAR, raising=False)
    monkeypatch.setenv("WSI_LLAVA_CACHE", str(blocker))
    assert compile_cache.configure() is None
    assert compile_cache.ENV_VAR not in os.environ
