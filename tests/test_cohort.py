"""Cohort featurization: deterministic size-balanced shards, a real 2-process run equal to 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from wsi_llava.encoders.cohort import DistEnv, estimate_tiles, list_slides, shard
from wsi_llava.errors import WsiLlavaError


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_shard_deterministic_and_covers_every_slide_once(world_size):
    rng = np.random.default_rng(world_size)
    weights = [int(w) for w in rng.integers(0, 5000, size=11)] + [0, 0, 700, 700]
    shards = shard(weights, world_size)
    assert shards == shard(list(weights), world_size)  # same answer every time / in every process
    assert len(shards) == world_size
    flat = sorted(i for s in shards for i in s)
    assert flat == list(range(len(weights)))
    loads = [sum(weights[i] for i in s) for s in shards]
    assert max(loads) - min(loads) <= max(weights)  # greedy largest-first bound
    if world_size > 1:
        naive = [sum(weights[i::world_size]) for i in range(world_size)]  # round-robin
        assert max(loads) <= max(naive)


def test_shard_balances_by_size_not_count():
    # one huge slide and many small ones: the huge one gets a rank to itself
    shards = shard([100, 10, 10, 10, 10, 10, 10], 2)
    assert shards[0] == [0]
    assert sorted(shards[1]) == [1, 2, 3, 4, 5, 6]


def test_dist_env_from_env():
    assert DistEnv.from_env({}) == DistEnv(0, 1, 0)
    assert DistEnv.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == DistEnv(3, 4, 1)
    assert DistEnv.from_env({"RANK": "1", "WORLD_SIZE": "2"}).local_rank == 1
    with pytest.raises(WsiLlavaError, match="RANK=2, WORLD_SIZE=2"):
        DistEnv.from_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(WsiLlavaError, match="WORLD_SIZE='two'"):
        DistEnv.from_env({"WORLD_SIZE": "two"})


def test_list_slides_folders_list_files_and_duplicates(world: Path, tmp_path: Path):
    slides = world / "slides"
    (tmp_path / "notes.txt").write_text("not a slide list entry")
    lst = tmp_path / "cohort.txt"
    lst.write_text(f"# two slides, one twice\n{slides / 'slide_001.tif'}\n\n{slides / 'slide_000.tif'}\n")
    got = list_slides([slides], lst)
    assert got == [slides / "slide_000.tif", slides / "slide_001.tif"]
    rel = tmp_path / "sub" / "rel.txt"
    rel.parent.mkdir()
    rel.write_text("../missing.svs\n")
    assert list_slides([], rel) == [tmp_path / "sub" / ".." / "missing.svs"]  # reported at extraction
    with pytest.raises(WsiLlavaError, match="empty.txt"):
        (tmp_path / "empty.txt").write_text("# nothing\n")
        list_slides([], tmp_path / "empty.txt")
    with pytest.raises(WsiLlavaError, match="no slide files"):
        list_slides([tmp_path / "sub"])
    assert estimate_tiles(slides / "slide_000.tif", 256, 0.5) == 64  # 2048 px at 0.5 µm/px
    assert estimate_tiles(tmp_path / "notes.txt", 256, 0.5) == 0


_RANK_SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
from wsi_llava.encoders.cache import FeatureCache
from wsi_llava.encoders.cohort import extract_cohort
from wsi_llava.encoders.tile import build_tile_encoder
slides, cache, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
report = extract_cohort(slides, build_tile_encoder("demo-vit"), FeatureCache(cache), device="cpu",
                        batch_size=16)
open(out, "w").write(report.model_dump_json())
"""


def _cache_contents(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    import zarr

    from wsi_llava.encoders.cache import FeatureCache

    out = {}
    for entry in FeatureCache(root).list():
        g = zarr.open_group(str(entry.path), mode="r")
        out[entry.name] = (np.asarray(g["coords"][:]), np.asarray(g["features"][:]), entry.n_tiles)
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp")]  # no temporary groups left
    return out


@pytest.fixture(scope="module")
def cohort(world: Path, tmp_path_factory) -> list[Path]:
    """Three generated slides of two sizes and a truncated one among them."""
    from wsi_llava.synth import generate_world

    extra = tmp_path_factory.mktemp("world2")
    generate_world(extra, n_slides=1, seed=2, size=(1536, 1536))
    bad = extra / "truncated.tif"
    src = (world / "slides" / "slide_000.tif").read_bytes()
    bad.write_bytes(src[: len(src) // 3])
    s1 = world / "slides"
    return [s1 / "slide_000.tif", extra / "slides" / "slide_000.tif", bad, s1 / "slide_001.tif"]


def test_two_processes_fill_the_same_cache_as_one(cohort: list[Path], tmp_path: Path):
    import torch

    from wsi_llava.encoders.cache import FeatureCache
    from wsi_llava.encoders.cohort import extract_cohort
    from wsi_llava.encoders.tile import build_tile_encoder

    # two ranks as torchrun would start them (env only; no process group), sharing one cache
    shared = tmp_path / "two"
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")}
    procs = []
    for rank in range(2):
        e = {**env, "RANK": str(rank), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        args = [json.dumps([str(p) for p in cohort]), str(shared), str(tmp_path / f"rank{rank}.json")]
        procs.append(subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, *args], env=e, text=True))

    # meanwhile the one-process reference, in this process
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = extract_cohort(
            cohort,
            build_tile_encoder("demo-vit"),
            FeatureCache(tmp_path / "one"),
            env=DistEnv(),
            device="cpu",
            batch_size=16,
        )
    finally:
        torch.set_num_threads(threads)
    assert [p.wait(timeout=300) for p in procs] == [0, 0]

    # one process: the truncated slide is reported by name, the four others are extracted
    assert [o.ok for o in one.outcomes] == [True, True, False, True]
    assert "truncated.tif" in one.error_summary() and "1 of 4 slides failed" in one.error_summary()
    assert one.outcomes[2].error and "truncated" in one.outcomes[2].error

    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    done = [[o["index"] for o in rep["outcomes"]] for rep in reports]
    assert sorted(done[0] + done[1]) == [0, 1, 2, 3] and done[0] and done[1]
    bad = [o for rep in reports for o in rep["outcomes"] if not o["ok"]]
    assert len(bad) == 1 and bad[0]["path"].endswith("truncated.tif")

    a, b = _cache_contents(tmp_path / "one"), _cache_contents(shared)
    assert len(a) == 3 and sorted(a) == sorted(b)
    for name, (coords, feats, n) in a.items():
        assert feats.shape == (n, 192)
        assert np.array_equal(coords, b[name][0])
        assert np.array_equal(feats, b[name][1]), name  # bit for bit
