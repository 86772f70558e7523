"""napari <-> level-0 coordinates, Shapes <-> Region conversion and the packaged npe2 manifest (no display)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from wsi_llava.errors import RegionError
from wsi_llava.slide.coords import level0_to_napari, napari_to_level0
from wsi_llava.slide.region import Region

ROOT = Path(__file__).resolve().parents[1]


def test_napari_to_level0_known_values():
    # a Shapes layer in µm (scale 1) over a slide shown at 0.5 µm/px: 100 µm is 200 level-0 px
    yx = np.array([[100.0, 50.0], [10.0, 0.0]])
    xy = napari_to_level0(yx, (1.0, 1.0), (0.0, 0.0), image_scale=(0.5, 0.5))
    np.testing.assert_allclose(xy, [[100.0, 200.0], [0.0, 20.0]])
    # same layer scale as the image: data coordinates are level-0 pixels, axes swapped
    np.testing.assert_allclose(napari_to_level0(yx, (0.5, 0.5), image_scale=(0.5, 0.5)), yx[:, ::-1])
    # translations of both layers, anisotropic scale, leading (z) axes ignored
    xy = napari_to_level0(
        np.array([[3.0, 7.0, 11.0]]), (1.0, 2.0, 4.0), (0.0, 5.0, -4.0), (1.0, 0.25, 0.5), (0.0, 1.0, 2.0)
    )
    np.testing.assert_allclose(xy, [[(11 * 4 - 4 - 2) / 0.5, (7 * 2 + 5 - 1) / 0.25]])


def test_round_trip_both_ways():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 50_000, size=(20, 2))
    kw = {"layer_scale": (0.7, 1.3), "layer_translate": (12.0, -3.0), "image_scale": (0.25, 0.5),
          "image_translate": (4.0, 9.0)}  # fmt: skip
    yx = level0_to_napari(xy, **kw)
    np.testing.assert_allclose(napari_to_level0(yx, **kw), xy, rtol=0, atol=1e-8)
    np.testing.assert_allclose(level0_to_napari(napari_to_level0(yx, **kw), **kw), yx, rtol=0, atol=1e-8)


def test_bad_coordinates_raise_region_error():
    with pytest.raises(RegionError, match="image scale must be non-zero"):
        napari_to_level0([[1, 2]], image_scale=(0, 1))
    with pytest.raises(RegionError, match=r"\(N, 2\)"):
        napari_to_level0([1, 2, 3])
    with pytest.raises(RegionError, match="finite"):
        level0_to_napari([[1, 2]], layer_scale=(np.nan, 1))


def test_shapes_regions_round_trip_keeps_properties():
    from napari_wsi_llava._shapes import COLUMNS, layer_to_regions, regions_to_shapes

    props = {
        "objectType": "annotation",
        "name": "T1",
        "classification": {"name": "Tumor", "color": [200, 0, 0]},
        "measurements": {"Area µm^2": 12.5},
        "metadata": {"ANNOTATION_DESCRIPTION": "old text", "other": "x"},
    }
    regions = [
        Region(
            points=[(10, 20), (110, 20), (110, 70), (10, 70)],
            kind="rectangle",
            id="a",
            name="T1",
            properties=props,
        ),  # fmt: skip
        Region(points=[(0, 0), (300, 0), (150, 200)], holes=[[(100, 20), (200, 20), (150, 60)]], id="b"),
    ]
    data, types, features = regions_to_shapes(regions, image_scale=(0.5, 0.5))
    assert types == ["rectangle", "polygon"]
    assert list(features.columns) == list(COLUMNS)
    assert features.loc[0, "description"] == "old text" and features.loc[0, "name"] == "T1"
    np.testing.assert_allclose(data[0][0], [20, 10])  # (y, x) level-0 = data coordinates
    back = layer_to_regions(data, types, features, layer_scale=(0.5, 0.5), image_scale=(0.5, 0.5))
    for a, b in zip(regions, back, strict=True):
        assert a.points == b.points and a.holes == b.holes and a.id == b.id and a.name == b.name
        assert a.properties == b.properties and a.kind == b.kind
    features.loc[0, "answer"] = "carcinoma"
    features.loc[0, "description"] = ""
    edited = layer_to_regions(data, types, features, layer_scale=(0.5, 0.5), image_scale=(0.5, 0.5))[0]
    assert edited.properties["metadata"] == {"other": "x", "wsi_llava.answer": "carcinoma"}
    with pytest.raises(RegionError, match="has no area"):
        layer_to_regions([np.array([[0, 0], [5, 5]])], ["line"], None)


def test_packaged_manifest_is_the_root_one_and_valid():
    from npe2 import PluginManifest

    packaged = ROOT / "napari_wsi_llava" / "napari.yaml"
    assert packaged.read_bytes() == (ROOT / "napari.yaml").read_bytes()
    manifest = PluginManifest.from_distribution("wsi-llava")
    assert manifest.name == "wsi-llava"
    assert manifest == PluginManifest.from_file(ROOT / "napari.yaml")
    manifest.validate_imports()
    npe2 = shutil.which("npe2") or str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "npe2")
    out = subprocess.run([npe2, "validate", "wsi-llava"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "valid" in out.stdout


def test_importing_the_plugin_package_stays_light():
    code = (
        "import sys, napari_wsi_llava, napari_wsi_llava._shapes, napari_wsi_llava._writer; "
        "bad = [m for m in ('torch', 'transformers', 'timm', 'qtpy', 'napari') if m in sys.modules]; "
        "assert not bad, bad"
    )
    import sys

    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _tile_world_box(layer, yx0, yx1) -> np.ndarray:
    """World ``(y, x)`` corners of the data-pixel box ``yx0..yx1`` (inclusive) of ``layer``: pixel edges
    lie half a pixel from the centres napari puts on integer data coordinates."""
    lo = np.asarray(layer.data_to_world(np.asarray(yx0, float) - 0.5))[-2:]
    hi = np.asarray(layer.data_to_world(np.asarray(yx1, float) + 0.5))[-2:]
    return np.stack([lo, hi])


def test_evidence_heatmap_is_one_cell_per_tile_aligned_with_its_tile():
    from napari.layers import Image

    from napari_wsi_llava._evidence import evidence_heatmap, evidence_layer_kwargs
    from wsi_llava.answer import Evidence

    # a 1200 x 1000 slide, 128-px tiles: edge tiles run past the slide; some tiles are not tissue
    w, h, t = 1200, 1000, 128
    xs, ys = np.meshgrid(np.arange(0, w, t), np.arange(0, h, t))
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1)
    rng = np.random.default_rng(3)
    keep = rng.random(len(coords)) > 0.3
    coords = coords[keep]
    scores = rng.random(len(coords))
    scores /= scores.sum()
    ev = Evidence(
        tile_indices=list(np.flatnonzero(keep)),
        coords=[tuple(map(int, c)) for c in coords],
        scores=list(scores),
        tile_size=t,
    )
    heat, origin, tile = evidence_heatmap(ev, (w, h))
    assert heat.shape == (-(-h // t), -(-w // t)) and origin == (0, 0) and tile == t
    expected = np.zeros_like(heat)
    expected[coords[:, 1] // t, coords[:, 0] // t] = scores / scores.max()
    np.testing.assert_allclose(heat, expected, rtol=1e-6)  # every tile its own cell, the rest 0

    scale, translate = (0.25, 0.5), (7.0, -3.0)
    slide = Image(np.zeros((h, w), np.uint8), scale=scale, translate=translate)
    overlay = Image(heat, **evidence_layer_kwargs(origin, tile, scale, translate))
    for x, y in coords[:: max(1, len(coords) // 15)]:
        cell = (y // t, x // t)
        np.testing.assert_allclose(
            _tile_world_box(overlay, cell, cell),
            _tile_world_box(slide, (y, x), (y + t - 1, x + t - 1)),
            atol=1e-9,
        )

    # asked without evidence: a blank map over the same grid; no tile grid at all: one blank cell
    blank, _, _ = evidence_heatmap(Evidence(tile_size=t), (w, h))
    assert blank.shape == heat.shape and not blank.any()
    none, _, _ = evidence_heatmap(Evidence(), (w, h))
    assert none.shape == (1, 1) and not none.any()
