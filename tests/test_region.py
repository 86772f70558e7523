"""Region geometry: parsing, bounds, containment with holes, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_llava.errors import RegionError
from wsi_llava.slide.region import Region, shape_kind


def test_parse_rect_and_bounds():
    r = Region.parse_rect("1200,800,2048,1024")
    assert r.kind == "rectangle"
    assert r.bounds == (1200, 800, 3248, 1824)
    assert r.area == pytest.approx(2048 * 1024)


@pytest.mark.parametrize("text", ["1,2,3", "a,b,c,d", "", "1,2,0,5", "1,2,5,-3"])
def test_parse_rect_rejects_bad_input(text):
    with pytest.raises(RegionError, match="--region|positive"):
        Region.parse_rect(text)


@pytest.mark.parametrize(
    "text", ["nan,0,10,10", "0,0,inf,10", "0,-inf,10,10", "1e308,0,1e308,10", "0,0,3e9,10"]
)
def test_parse_rect_refuses_non_finite_and_huge_numbers_naming_the_option(text):
    with pytest.raises(RegionError, match=r"--region .*finite level-0 pixel numbers"):
        Region.parse_rect(text)


def test_contains_respects_holes():
    r = Region(
        points=[(0, 0), (100, 0), (100, 100), (0, 100)], holes=[[(40, 40), (60, 40), (60, 60), (40, 60)]]
    )
    xs = np.array([10, 50, 150])
    ys = np.array([10, 50, 50])
    assert r.contains(xs, ys).tolist() == [True, False, False]
    assert r.area == pytest.approx(100 * 100 - 20 * 20)


def test_closed_ring_and_degenerate_polygon():
    r = Region(points=[(0, 0), (10, 0), (10, 10), (0, 0)])
    assert len(r.points) == 3
    with pytest.raises(ValueError):
        Region(points=[(0, 0), (1, 1)])


def test_check_within_slide():
    Region.rectangle(10, 10, 5, 5).check_within(100, 100)
    with pytest.raises(RegionError, match="outside the slide"):
        Region.rectangle(200, 200, 5, 5).check_within(100, 100, source="--region")


def test_shape_kind_needs_axis_aligned_edges_in_order():
    square = [(0, 0), (10, 0), (10, 10), (0, 10)]
    assert shape_kind(square) == "rectangle" and shape_kind(square + square[:1]) == "rectangle"
    assert shape_kind([(0, 0), (10, 10), (10, 0), (0, 10)]) == "polygon"  # bow-tie on the same corners
    assert shape_kind(square, holes=[[(2, 2), (3, 2), (3, 3)]]) == "polygon"
    assert shape_kind([(0, 0), (10, 0), (12, 10), (0, 10)]) == "polygon"
