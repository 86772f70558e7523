"""A feature cache that cannot lie: damaged or unverifiable entries are misses and are extracted again,
edited slides get new keys, and temporary groups of killed writers are cleaned up."""

from __future__ import annotations

import logging
import os
import stat
import time

import numpy as np
import pytest
import zarr
from kits.cache import damage, feature_chunks, start_held_write, write_pyramid

from wsi_llava.errors import CacheError
from wsi_llava.features.cache import CacheKey, FeatureCache
from wsi_llava.features.extract import cache_key_for, extract_features
from wsi_llava.features.tile import build_tile_encoder
from wsi_llava.slide import open_slide
from wsi_llava.slide.tiling import make_tile_grid

DAMAGE = ("delete", "truncate", "flip")


def _key(**kw) -> CacheKey:
    base = dict(slide_fingerprint="abc123", encoder_id="demo-vit:random-seed0", tile_size=256, target_mpp=0.5)
    return CacheKey(**{**base, **kw})


def _fill(cache: FeatureCache, key: CacheKey, n: int = 1100, d: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    coords = rng.integers(0, 10**6, (n, 2)).astype(np.int32)
    feats = rng.standard_normal((n, d)).astype(np.float16)
    with cache.write(key, n, d, attrs={"slide_path": "/x/slide.svs"}) as w:
        w.write_coords(coords)
        for s in range(0, n, 100):
            w.write(np.arange(s, min(n, s + 100)), feats[s : s + 100])
    return coords, feats


def _warnings(caplog) -> list[str]:
    """The cache's warnings (not, say, the one about an untrained encoder)."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name == "wsi_llava.features.cache"
    ]


def _entries(root) -> list:
    return [p for p in root.iterdir() if p.name != ".locks"]


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_chunk_is_a_miss_with_one_warning_and_the_entry_goes(cache_dir, caplog, kind):
    cache = FeatureCache(cache_dir)
    key = _key()
    _fill(cache, key)
    chunks = feature_chunks(cache.path_for(key))
    assert len(chunks) == 3  # 1100 rows in chunks of 512
    damage(chunks[1], kind)
    with caplog.at_level(logging.WARNING):
        assert cache.get(key) is None
        assert cache.get(key) is None  # gone: a second look is a plain miss
    [warning] = _warnings(caplog)
    assert "/x/slide.svs" in warning and "extracted again" in warning
    assert not cache.path_for(key).exists() and _entries(cache_dir) == []


def test_damaged_coords_are_a_miss(cache_dir):
    cache = FeatureCache(cache_dir)
    key = _key()
    _fill(cache, key)
    [chunk] = [
        p for p in (cache.path_for(key) / "coords").rglob("*") if p.is_file() and p.name != "zarr.json"
    ]
    damage(chunk, "flip")
    assert cache.get(key) is None


@pytest.mark.parametrize("kind", DAMAGE)
def test_an_entry_damaged_then_rewritten_is_served_again(cache_dir, kind):
    """A damaged entry never blocks its own replacement (it used to be kept as 'complete' forever)."""
    cache = FeatureCache(cache_dir)
    key = _key()
    _fill(cache, key)
    damage(feature_chunks(cache.path_for(key))[0], kind)
    # rewritten without a read first: the damaged copy under the final name is replaced, not kept
    coords, feats = _fill(cache, key, seed=5)
    got = cache.get(key)
    assert got is not None
    assert np.array_equal(got.coords, coords) and np.array_equal(got.features, feats)


def test_an_entry_written_without_an_integrity_record_is_not_trusted(cache_dir, caplog):
    """Entries of older versions carry no record of what they held: extracted again, never served."""
    cache = FeatureCache(cache_dir)
    key = _key()
    path = cache.path_for(key)
    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    g.create_array("coords", shape=(10, 2), chunks=(10, 2), dtype="int32")[:] = np.arange(20).reshape(10, 2)
    g.create_array("features", shape=(10, 4), chunks=(10, 4), dtype="float16")[:] = np.ones((10, 4))
    g.attrs.update(
        {
            "format_version": 1,
            **key.model_dump(),
            "n_tiles": 10,
            "dim": 4,
            "slide_path": "/x/old.svs",
            "complete": True,
        }
    )
    with caplog.at_level(logging.WARNING):
        assert cache.get(key) is None
    [warning] = _warnings(caplog)
    assert "/x/old.svs" in warning and "integrity" in warning
    assert not path.exists()


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    return write_pyramid(tmp_path_factory.mktemp("slides") / "ihc.tif")


@pytest.fixture(scope="module")
def encoder():
    return build_tile_encoder("demo-vit")


@pytest.mark.parametrize("kind", DAMAGE)
def test_extraction_replaces_a_damaged_entry(slide, encoder, cache_dir, caplog, kind):
    """The whole path: damaged -> one warning naming the slide -> encoded again -> the same features."""
    cache = FeatureCache(cache_dir)
    calls: list[int] = []
    handle = encoder.register_forward_pre_hook(lambda m, a: calls.append(len(a[0])))
    try:
        with open_slide(slide) as reader:
            grid = make_tile_grid(reader, target_mpp=0.5, tile_size=128, min_tissue=0)
            first = extract_features(reader, grid, encoder, cache, batch_size=16)
            assert first.encoded and sum(calls) == 48
            damage(feature_chunks(first.path)[0], kind)
            calls.clear()
            with caplog.at_level(logging.WARNING):
                again = extract_features(reader, grid, encoder, cache, batch_size=16)
            assert again.encoded and sum(calls) == 48
            assert np.array_equal(again.features, first.features)
            [warning] = _warnings(caplog)
            assert str(slide) in warning
            calls.clear()
            third = extract_features(reader, grid, encoder, cache, batch_size=16)
            assert not third.encoded and calls == []  # the replacement is served from the cache
            assert np.array_equal(third.features, first.features)
    finally:
        handle.remove()


def test_same_size_in_place_edit_gives_a_new_key(tmp_path):
    """The fingerprint samples the head and tail only; an edit in the middle changes size+mtime instead."""
    path = write_pyramid(tmp_path / "plain.tif", compression=None)
    size = path.stat().st_size
    assert size > 3 << 20  # the middle lies outside the sampled first and last MB
    with open_slide(path) as reader:
        grid = make_tile_grid(reader, target_mpp=0.5, tile_size=128, min_tissue=0)
        before = cache_key_for(reader, grid, "enc")
    with open_slide(path) as reader:
        assert cache_key_for(reader, grid, "enc") == before  # unchanged file, same key
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(size // 2)
        old = f.read(4096)
        f.seek(size // 2)
        f.write(bytes(b ^ 0x5A for b in old))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    assert path.stat().st_size == size
    with open_slide(path) as reader:
        after = cache_key_for(reader, grid, "enc")
    assert after.slide_fingerprint != before.slide_fingerprint and after.name != before.name


def _temps(root) -> list:
    return [p for p in root.iterdir() if p.name.startswith(".") and p.name != ".locks"]


def test_temp_group_of_a_killed_writer_is_cleaned_when_the_cache_is_written(cache_dir):
    """A killed writer's temporary group goes once it is old and unlocked; a live writer's never does."""
    proc = start_held_write(cache_dir, "held")
    held = _key(slide_fingerprint="held", encoder_id="enc", tile_size=8, target_mpp=1.0)
    try:
        [tmp] = _temps(cache_dir)
        old = time.time() - 3600
        os.utime(tmp, (old, old))
        with pytest.raises(CacheError, match="busy"), FeatureCache(cache_dir).lock(held, timeout=0):
            pass
        _fill(FeatureCache(cache_dir), _key(slide_fingerprint="other"))
        assert tmp.exists()  # old, but its writer is alive and holds the entry's lock
    finally:
        proc.kill()
        proc.wait()
    with FeatureCache(cache_dir).lock(held, timeout=30):  # the dead writer's lock went with it
        pass
    os.utime(tmp, None)
    _fill(FeatureCache(cache_dir), _key(slide_fingerprint="young"))
    assert tmp.exists()  # unlocked but fresh: left alone for now
    os.utime(tmp, (old, old))
    _fill(FeatureCache(cache_dir), _key(slide_fingerprint="third"))
    assert not tmp.exists() and _temps(cache_dir) == []
    assert len(_entries(cache_dir)) == 3


def test_an_entry_has_the_mode_mkdir_would_give_it(cache_dir):
    """Written through a private temporary folder, an entry still opens to whoever the umask lets in."""
    old = os.umask(0o022)
    try:
        cache = FeatureCache(cache_dir)
        _fill(cache, _key())
    finally:
        os.umask(old)
    assert stat.S_IMODE(cache.path_for(_key()).stat().st_mode) == 0o755
