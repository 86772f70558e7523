"""Cohort featurization: the claim queue; a real 2-rank torchrun run (dynamic claiming) equals 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from wsi_llava.errors import WsiLlavaError
from wsi_llava.features.cohort import DistEnv, _SlideQueue, claim_order, estimate_tiles, list_slides


def test_claim_order_largest_first_ties_by_index():
    assert claim_order([5, 100, 0, 100, 7]) == [1, 3, 4, 0, 2]
    assert claim_order([]) == []


def test_local_queue_hands_out_each_slide_once():
    q = _SlideQueue([2, 0, 1])
    assert [q.claim(), q.claim(), q.claim(), q.claim(), q.claim()] == [2, 0, 1, None, None]
    assert [q.finished_one() for _ in range(3)] == [1, 2, 3]


def test_several_ranks_need_torchrun(world: Path, monkeypatch):
    from wsi_llava.features.cohort import extract_cohort

    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(WsiLlavaError, match="WORLD_SIZE=2.*torchrun"):
        extract_cohort([world / "slides" / "slide_000.tif"], None, None, env=DistEnv(1, 2, 1), device="cpu")


def test_progress_counts_slides_and_cancel_stops_between_slides(cohort: list[Path], tmp_path: Path):
    from wsi_llava.errors import Cancelled
    from wsi_llava.features.cache import FeatureCache
    from wsi_llava.features.cohort import extract_cohort
    from wsi_llava.features.tile import build_tile_encoder
    from wsi_llava.progress import CancelToken

    slides = [cohort[1], cohort[0]]  # the 1536 px slide, then a 2048 px one
    token, seen = CancelToken(), []

    def progress(done: int, total: int, message: str) -> None:
        seen.append((done, total, message))
        if message == "rank 0/1: slides" and done == 1:
            token.cancel()  # after the first slide: the second is never started

    with pytest.raises(Cancelled):
        extract_cohort(
            slides,
            build_tile_encoder("demo-vit"),
            FeatureCache(tmp_path / "c"),
            env=DistEnv(),
            device="cpu",
            batch_size=32,
            progress=progress,
            cancel=token,
        )
    assert [s for s in seen if s[2] == "rank 0/1: slides"] == [
        (0, 2, "rank 0/1: slides"),
        (1, 2, "rank 0/1: slides"),
    ]
    tiles = [s for s in seen if s[2] == "rank 0/1: slide_000.tif"]  # the first slide's tiles, all done
    assert tiles and tiles[-1][0] == tiles[-1][1] > 0
    assert len({s[2] for s in seen}) == 2  # nothing of the second slide
    assert len(FeatureCache(tmp_path / "c").list()) == 1


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


#: one torchrun rank; rank 0 holds its first slide until rank 1 has finished three (and rank 1 starts
#: once rank 0 has claimed one), so only dynamic claiming, not a fixed share, lets rank 1 take three
_RANK_SCRIPT = """
import json, os, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from wsi_llava.features import cohort
from wsi_llava.features.cache import FeatureCache
from wsi_llava.features.tile import build_tile_encoder
slides, cache, out = json.loads(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
rank, real, done = int(os.environ["RANK"]), cohort._extract_one, []

def wait_for(marker):
    deadline = time.monotonic() + 60
    while not (out / marker).exists() and time.monotonic() < deadline:
        time.sleep(0.05)

def held(*args, **kw):
    if rank == 0 and not done:
        (out / "rank0.claimed").touch()
        wait_for("rank1.three")
    if rank == 1 and not done:
        wait_for("rank0.claimed")
    outcome = real(*args, **kw)
    done.append(outcome.index)
    if rank == 1 and len(done) == 3:
        (out / "rank1.three").touch()
    return outcome

cohort._extract_one = held
report = cohort.extract_cohort(slides, build_tile_encoder("demo-vit"), FeatureCache(cache), device="cpu",
                               batch_size=16)
(out / f"rank{rank}.json").write_text(report.model_dump_json())
"""


def _cache_contents(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    import zarr

    from wsi_llava.features.cache import FeatureCache

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


def test_torchrun_ranks_claim_dynamically_and_fill_the_same_cache_as_one(
    cohort: list[Path], tmp_path: Path, spawn
):
    import torch

    from wsi_llava.features.cache import FeatureCache
    from wsi_llava.features.cohort import extract_cohort
    from wsi_llava.features.tile import build_tile_encoder

    # two ranks under torchrun (gloo group, claims through its store), sharing one cache
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    shared = tmp_path / "two"
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)]
    proc = spawn(  # stopped, ranks included (its own session), however the test ends
        [*run, json.dumps([str(p) for p in cohort]), str(shared), str(tmp_path)],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

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
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log[-3000:]

    # one process: list order; the truncated slide is reported by name, the three others are extracted
    assert [t.slides for t in one.timings] == [[0, 1, 2, 3]]
    assert [o.ok for o in one.outcomes] == [True, True, False, True]
    assert "truncated.tif" in one.error_summary() and "1 of 4 slides failed" in one.error_summary()
    assert one.outcomes[2].error and "truncated" in one.outcomes[2].error

    # torchrun: both ranks return the whole cohort; every slide claimed by exactly one rank, largest
    # first (2048 px slides 0 and 3, then the 1536 px slide 1, then the unreadable one); rank 0 was held
    # on its first slide, so rank 1 claimed the other three
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert reports[0]["outcomes"] == reports[1]["outcomes"] and reports[0]["timings"] == reports[1]["timings"]
    claims = {t["rank"]: t["slides"] for t in reports[0]["timings"]}
    assert sorted(claims[0] + claims[1]) == [0, 1, 2, 3]
    order = [0, 3, 1, 2]
    for slides in claims.values():
        assert slides == sorted(slides, key=order.index)
    assert len(claims[0]) == 1 and len(claims[1]) == 3 and claims[1][-1] == 2
    by_index = {o["index"]: o for o in reports[0]["outcomes"]}
    assert [by_index[i]["rank"] for i in claims[1]] == [1, 1, 1]
    bad = [o for o in reports[0]["outcomes"] if not o["ok"]]
    assert len(bad) == 1 and bad[0]["path"].endswith("truncated.tif") and "truncated" in bad[0]["error"]

    a, b = _cache_contents(tmp_path / "one"), _cache_contents(shared)
    assert len(a) == 3 and sorted(a) == sorted(b)
    for name, (coords, feats, n) in a.items():
        assert feats.shape == (n, 192)
        assert np.array_equal(coords, b[name][0])
        assert np.array_equal(feats, b[name][1]), name  # bit for bit
