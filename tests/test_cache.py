"""``FeatureCache``: zarr v3 groups keyed by slide + encoder + tiling, written atomically."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import zarr

from wsi_llava.errors import CacheError
from wsi_llava.features.cache import CacheKey, FeatureCache, grid_hash


def _contents(root) -> list:
    """What a cache folder holds besides its lock files."""
    return [p for p in root.iterdir() if p.name != ".locks"]


def _key(**kw) -> CacheKey:
    base = dict(slide_fingerprint="abc123", encoder_id="demo-vit:random-seed0", tile_size=256, target_mpp=0.5)
    base.update(kw)
    return CacheKey(**base)


def _fill(cache: FeatureCache, key: CacheKey, n: int = 1100, d: int = 8, order=None):
    rng = np.random.default_rng(0)
    coords = rng.integers(0, 10**6, (n, 2)).astype(np.int32)
    feats = rng.standard_normal((n, d)).astype(np.float32)
    order = np.arange(n) if order is None else order
    with cache.write(key, n, d, attrs={"tile_size_level0": 512, "slide_path": "/x/slide.svs"}) as w:
        w.write_coords(coords)
        for s in range(0, n, 64):
            idx = order[s : s + 64]
            w.write(idx, feats[idx])
    return coords, feats


def test_round_trip_attrs_and_layout(cache_dir):
    cache = FeatureCache(cache_dir)
    key = _key()
    assert cache.get(key) is None
    coords, feats = _fill(cache, key)
    got = cache.get(key)
    assert got is not None
    assert got.coords.dtype == np.int32 and np.array_equal(got.coords, coords)
    assert got.features.dtype == np.float16 and np.array_equal(got.features, feats.astype(np.float16))
    assert got.attrs["complete"] is True and got.attrs["n_tiles"] == 1100
    assert got.attrs["encoder_id"] == key.encoder_id and got.attrs["slide_fingerprint"] == "abc123"
    assert got.tile_size_level0 == 512 and got.attrs["slide_path"] == "/x/slide.svs" and got.attrs["created"]
    # a real zarr v3 group with the two arrays
    meta = json.loads((got.path / "zarr.json").read_text())
    assert meta["zarr_format"] == 3 and meta["node_type"] == "group"
    g = zarr.open_group(str(got.path), mode="r")
    assert g["features"].shape == (1100, 8) and g["coords"].shape == (1100, 2)
    assert got.path.name == key.name and len(key.name) == 20
    [entry] = cache.list()
    assert (
        entry.n_tiles == 1100
        and entry.dim == 8
        and entry.encoder_id == key.encoder_id
        and entry.size_bytes > 0
    )


def test_out_of_order_batches(cache_dir):
    cache = FeatureCache(cache_dir)
    order = np.random.default_rng(1).permutation(1100)
    _, feats = _fill(cache, _key(), order=order)
    assert np.array_equal(cache.get(_key()).features, feats.astype(np.float16))


def test_other_keys_miss_and_stale_groups_are_never_returned(cache_dir):
    cache = FeatureCache(cache_dir)
    key = _key()
    _fill(cache, key)
    for other in (
        _key(encoder_id="demo-vit:sha256-0011"),
        _key(tile_size=224),
        _key(target_mpp=0.25),
        _key(slide_fingerprint="zzz"),
        _key(grid_hash=grid_hash(np.zeros((3, 2)))),
    ):
        assert other.name != key.name
        assert cache.get(other) is None
    # a group whose attrs disagree with the key it is filed under is ignored
    g = zarr.open_group(str(cache.path_for(key)), mode="a")
    g.attrs["encoder_id"] = "something-else"
    assert cache.get(key) is None


def test_crash_mid_write_leaves_nothing(cache_dir):
    cache = FeatureCache(cache_dir)
    key = _key()
    with pytest.raises(RuntimeError, match="boom"), cache.write(key, 100, 4) as w:
        w.write_coords(np.zeros((100, 2)))
        w.write(np.arange(50), np.ones((50, 4)))
        raise RuntimeError("boom")
    assert cache.get(key) is None
    assert _contents(cache_dir) == []


def test_incomplete_write_is_an_error(cache_dir):
    cache = FeatureCache(cache_dir)
    with pytest.raises(CacheError, match="40 of 100 tiles missing"), cache.write(_key(), 100, 4) as w:
        w.write_coords(np.zeros((100, 2)))
        w.write(np.arange(60), np.ones((60, 4)))
    assert _contents(cache_dir) == []
    with pytest.raises(CacheError, match=r"features must be \(2, 4\)"), cache.write(_key(), 10, 4) as w:
        w.write(np.arange(2), np.ones((2, 5)))


def test_leftover_temp_dir_of_killed_process(cache_dir):
    cache = FeatureCache(cache_dir)
    key = _key()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tmp = cache_dir / f".tmp-{key.name}-{dead.pid}-deadbeef"
    g = zarr.open_group(str(tmp), mode="w")
    g.create_array("features", shape=(4, 2), dtype="float16")
    g.attrs.update({**key.model_dump(), "complete": True, "n_tiles": 4})
    # an interrupted group under the final name without the marker
    half = zarr.open_group(str(cache.path_for(key)), mode="w")
    half.attrs.update(key.model_dump())
    assert cache.list() == []
    assert cache.clean() == 2
    assert _contents(cache_dir) == []
    assert cache.get(key) is None


def test_unwritable_root_names_the_path(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(CacheError, match="a-file"):
        FeatureCache(blocker)
    with pytest.raises(CacheError, match="a-file/sub"):
        FeatureCache(blocker / "sub")


def test_concurrent_writers_of_one_key_keep_the_first_complete_copy(cache_dir):
    """Two processes finishing the same entry: the later one keeps the copy already in place, no error."""
    cache = FeatureCache(cache_dir)
    key = _key()
    n, d = 40, 4
    coords = np.arange(2 * n, dtype=np.int32).reshape(n, 2)
    with cache.write(key, n, d) as late:  # started first, finishes last
        late.write_coords(coords)
        late.write(np.arange(n), np.full((n, d), 2.0, dtype=np.float32))
        with cache.write(key, n, d) as early:
            early.write_coords(coords)
            early.write(np.arange(n), np.ones((n, d), dtype=np.float32))
        first = cache.get(key)
        assert first is not None and float(first.features[0, 0]) == 1.0
    kept = cache.get(key)
    assert kept is not None and float(kept.features[0, 0]) == 1.0 and kept.path == first.path
    assert not [p for p in _contents(cache_dir) if p.name.startswith(".")]  # no temp folder left behind
