"""``wsi-llava ask --evidence-png``: the slide thumbnail with the answer's relevance map, on a real slide."""

from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from wsi_llava.answer import Evidence
from wsi_llava.cli import cli
from wsi_llava.evidence_image import DEFAULT_MAX_SIZE, overlay, relevance_map
from wsi_llava.slide import open_slide
from wsi_llava.slide.region import Region
from wsi_llava.slide.tiling import overview


def test_overlay_colours_relevant_cells_and_keeps_the_rest():
    thumb = np.full((100, 200, 3), 240, np.uint8)  # a 2000 x 1000 slide at 1/10
    ev = Evidence(
        tile_indices=[0, 1, 2], coords=[(0, 0), (100, 0), (1000, 500)], scores=[0.6, 0.3, 0.0], tile_size=100
    )
    rel = relevance_map(ev, (200, 100), (2000, 1000))
    assert rel[:10, :10].min() == rel.max() == 1.0 and rel[:10, 10:20].max() == pytest.approx(0.5)
    assert rel[:, 20:].max() == 0  # the zero-relevance tile and the area without tiles
    out = overlay(thumb, ev, (2000, 1000))
    assert (out[:10, :10] != 240).any(axis=-1).all()
    assert np.array_equal(out[:, 20:], thumb[:, 20:])
    boxed = overlay(thumb, ev, (2000, 1000), Region.rectangle(1200, 200, 400, 400))
    assert (boxed[20:60, 120] != 240).any() and np.array_equal(boxed[70:, 170:], thumb[70:, 170:])


def _ask(*args: str):
    return CliRunner().invoke(cli, ["ask", *args], catch_exceptions=False)


def test_ask_writes_the_evidence_png(world, tiny_model, tmp_path):
    slide = world / "slides" / "slide_000.tif"
    png = tmp_path / "evidence.png"
    r = _ask(str(slide), "Describe this region.", "--region", "100,100,900,700", "--model", tiny_model,
             "--max-new-tokens", "3", "--json", "--evidence-png", str(png))  # fmt: skip
    assert r.exit_code == 0, r.output
    answer = json.loads(r.stdout)
    with open_slide(slide) as reader:
        thumb = overview(reader, max_size=DEFAULT_MAX_SIZE)
        w0, h0 = reader.dimensions
    got = np.asarray(Image.open(png).convert("RGB"))
    assert got.shape == thumb.shape and max(got.shape[:2]) == DEFAULT_MAX_SIZE
    ev = answer["evidence"]
    top = int(np.argmax(ev["scores"]))
    x, y = ev["coords"][top]
    sx, sy = thumb.shape[1] / w0, thumb.shape[0] / h0
    half = ev["tile_size"] / 2
    cx, cy = round((x + half) * sx), round((y + half) * sy)
    assert (
        (got[cy - 3 : cy + 3, cx - 3 : cx + 3] != thumb[cy - 3 : cy + 3, cx - 3 : cx + 3]).any(axis=-1).all()
    )
    far = slice(round(1400 * sy), round(2000 * sy)), slice(round(1400 * sx), round(2000 * sx))
    assert np.array_equal(got[far], thumb[far])  # no tile of the question there: the thumbnail's pixels
    assert not list(tmp_path.glob(".*.tmp"))


def test_evidence_png_bad_path_is_one_error_before_any_work(world, tiny_model, tmp_path, monkeypatch):
    slide = str(world / "slides" / "slide_000.tif")
    missing = tmp_path / "no such folder" / "e.png"
    base = [slide, "What is this?", "--model", tiny_model, "--max-new-tokens", "3"]
    r = CliRunner().invoke(cli, ["ask", *base, "--evidence-png", str(missing)])
    assert r.exit_code == 1
    assert f"Error: {missing}: cannot write the evidence PNG: its folder does not exist" in r.output
    assert "Traceback" not in r.output and not missing.parent.exists()
    r = CliRunner().invoke(cli, ["ask", *base, "--evidence-png", str(tmp_path)])
    assert r.exit_code == 2 and "is a directory" in r.output  # click's own check of the option
    r = CliRunner().invoke(
        cli, ["ask", "--features", str(tmp_path / "t.pt"), "Q?", "--evidence-png", "e.png"]
    )
    assert r.exit_code == 1 and "--evidence-png need a slide" in r.output

    # a write that fails at the end leaves the earlier file whole and no temporary behind
    png = tmp_path / "e.png"
    png.write_bytes(b"earlier picture")

    def disk_full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(os, "replace", disk_full)
    r = CliRunner().invoke(cli, ["ask", *base, "--evidence-png", str(png)])
    monkeypatch.undo()
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert f"Error: {png}: cannot write the evidence PNG: No space left on device" in r.output
    assert png.read_bytes() == b"earlier picture" and sorted(p.name for p in tmp_path.iterdir()) == ["e.png"]
