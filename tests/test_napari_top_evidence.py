"""Top evidence without a display: picking the most relevant tiles, reading their thumbnails from a layer's
pyramid, and the camera view that shows one tile."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_llava.answer import Evidence

pytest.importorskip("napari")


def _pyramid(level0: np.ndarray, n: int) -> list[np.ndarray]:
    levels = [level0]
    for _ in range(n - 1):
        p = levels[-1]
        h, w = p.shape[0] // 2 * 2, p.shape[1] // 2 * 2
        levels.append(p[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)).astype(np.uint8))
    return levels


def test_top_tiles_are_the_highest_positive_scores_in_order():
    from napari_wsi_llava._top_evidence import top_tiles

    scores = [0.05, 0.2, 0.0, 0.1, 0.2, 0.02, 0.08, 0.03, 0.12, 0.04, 0.06, 0.1]
    coords = [(256 * (i % 4), 256 * (i // 4)) for i in range(len(scores))]
    ev = Evidence(tile_indices=list(range(100, 112)), coords=coords, scores=scores, tile_size=256)
    top = top_tiles(ev)
    assert [t.tile_index for t in top] == [101, 104, 108, 103, 111, 106, 110, 100]  # ties keep their order
    assert [t.rank for t in top] == list(range(1, 9))
    assert [t.xy for t in top] == [coords[t.tile_index - 100] for t in top]
    assert top[0].label == "1 · 20.0 %" and top[7].label == "8 · 5.0 %"
    assert top[0].center_data == (256 + 127.5, 127.5)
    # fewer positive scores than places: zero-relevance tiles are not listed
    few = ev.model_copy(update={"scores": [0.0] * 10 + [0.75, 0.25]})
    assert [t.tile_index for t in top_tiles(few)] == [110, 111]
    # no evidence: evidence off (tile grid only) or precomputed tokens (no grid)
    assert top_tiles(Evidence(tile_size=256)) == [] and top_tiles(Evidence()) == []


def test_thumbnails_come_from_the_right_level_and_place():
    import dask.array as da
    from napari.layers import Image

    from napari_wsi_llava._top_evidence import layer_levels, tile_thumbnail

    rng = np.random.default_rng(5)
    level0 = rng.integers(0, 255, size=(1000, 1200, 3), dtype=np.uint8)
    levels = _pyramid(level0, 4)  # downsamples 1, 2, 4, 8
    layer = Image([da.from_array(lv, chunks=(256, 256, 3)) for lv in levels], multiscale=True, rgb=True)
    pyramid = layer_levels(layer)
    assert len(pyramid) == 4
    # a 128-px tile at 32 px: level 2 (4x) holds it at exactly that size
    thumb = tile_thumbnail(pyramid, (384, 256), 128, size=32)
    assert thumb.shape == (32, 32, 3) and thumb.dtype == np.uint8
    np.testing.assert_array_equal(thumb, levels[2][64:96, 96:128])
    # an edge tile: what lies beyond the slide is white
    edge = tile_thumbnail(pyramid, (1152, 896), 128, size=32)
    np.testing.assert_array_equal(edge[:26, :12], levels[2][224:250, 288:300])
    assert (edge[:, 12:] == 255).all() and (edge[26:] == 255).all()
    # a tile smaller than the thumbnail: level 0, scaled up
    small = tile_thumbnail(pyramid, (10, 20), 16, size=32)
    np.testing.assert_array_equal(small[::2, ::2], level0[20:36, 10:26])
    # a single-level grey layer
    grey = Image(level0[..., 0])
    np.testing.assert_array_equal(
        tile_thumbnail(layer_levels(grey), (0, 0), 32, 32, rgb=False)[..., 1], level0[:32, :32, 0]
    )


def test_tile_view_centres_the_tile_and_fits_a_few_across():
    from napari.layers import Image

    from napari_wsi_llava._top_evidence import TopTile, tile_view

    scale, translate = (0.5, 0.25), (10.0, -4.0)
    slide = Image(np.zeros((4096, 4096), np.uint8), scale=scale, translate=translate)
    tile = TopTile(rank=1, tile_index=7, xy=(1024, 512), tile=256, score=0.3)
    centre, zoom = tile_view(tile, scale, translate, canvas_size=(600, 900), tiles_across=4)
    lo = np.asarray(slide.data_to_world((512 - 0.5, 1024 - 0.5)))
    hi = np.asarray(slide.data_to_world((512 + 256 - 0.5, 1024 + 256 - 0.5)))
    np.testing.assert_allclose(centre, (lo + hi) / 2)  # the middle of the tile's pixels, in world units
    on_screen = (hi - lo) * zoom  # screen px the tile spans (y, x)
    assert on_screen.max() == pytest.approx(600 / 4) and (on_screen <= np.array([600, 900]) / 4 + 1e-9).all()
