"""The ``wsi-llava`` command end to end on synthetic and real slides, and its bad-input messages."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from kits.cli import assert_user_error, run_cli

pytestmark = pytest.mark.integration


def test_synth_extract_ask_json(world: Path, shared_cache: Path, tmp_path: Path):
    slide = world / "slides" / "slide_000.tif"
    out = run_cli(
        "extract", str(slide), "--encoder", "demo-vit", "--cache", str(shared_cache), cache=shared_cache
    )
    assert "tiles" in out.stdout

    out = run_cli(
        "ask",
        str(slide),
        "What tissue types are present?",
        "--json",
        "--max-new-tokens",
        "12",
        cache=shared_cache,
    )
    ans = json.loads(out.stdout)
    assert set(ans) >= {"question", "answer", "scope", "region", "model", "evidence", "timings"}
    assert ans["scope"] == "slide" and ans["region"] is None
    assert ans["answer"].strip()
    assert ans["demo"] is True and "demo" in ans["notice"]
    ev = ans["evidence"]
    assert len(ev["tile_indices"]) == len(ev["coords"]) == len(ev["scores"]) > 0
    assert abs(sum(ev["scores"]) - 1) < 1e-3
    assert ans["timings"]["decode"] > 0 and ans["timings"]["prefill"] > 0

    out = run_cli(
        "ask",
        str(slide),
        "Describe this region.",
        "--region",
        "512,512,768,768",
        "--json",
        "--max-new-tokens",
        "8",
        cache=shared_cache,
    )
    reg = json.loads(out.stdout)
    assert reg["scope"] == "region" and reg["region"]["kind"] == "rectangle"
    assert 0 < len(reg["evidence"]["tile_indices"]) < len(ev["tile_indices"])
    xs = np.array([c[0] for c in reg["evidence"]["coords"]])
    assert xs.min() >= 512 - 512 and xs.max() <= 512 + 768  # tiles inside the rectangle


def test_ask_geojson_annotation_and_streaming(world: Path, shared_cache: Path):
    from wsi_llava.slide.geojson import read_geojson

    slide = world / "slides" / "slide_000.tif"
    ann = world / "annotations" / "slide_000.geojson"
    region = max(read_geojson(ann), key=lambda r: r.area)
    out = run_cli(
        "ask",
        str(slide),
        "What tissue is in this region?",
        "--geojson",
        str(ann),
        "--id",
        region.id,
        "--max-new-tokens",
        "8",
        cache=shared_cache,
    )
    assert out.stdout.strip()  # streamed text
    assert "demo" in out.stderr  # the demo label goes to stderr, the answer to stdout


def test_models_lists_builtins(shared_cache: Path):
    out = run_cli("models", "--json", cache=shared_cache)
    data = json.loads(out.stdout)
    assert "demo" in {m["name"] for m in data["models"]}
    assert {"demo-vit", "prov-gigapath", "uni"} <= {m["name"] for m in data["tile encoders"]}
    assert {"openslide", "tifffile"} <= {m["name"] for m in data["slide readers"]}


def test_ask_real_svs_region(cmu_svs: Path, shared_cache: Path):
    out = run_cli(
        "ask",
        str(cmu_svs),
        "Describe this region.",
        "--region",
        "600,600,1024,1024",
        "--json",
        "--max-new-tokens",
        "6",
        cache=shared_cache,
    )
    ans = json.loads(out.stdout)
    assert ans["scope"] == "region" and ans["evidence"]["tile_size"] == 257  # round(256 * 0.5 / 0.499)


# --- bad input: one clear message naming the file or field, non-zero exit, no traceback -------------


def test_corrupt_slide(tmp_path: Path, shared_cache: Path):
    bad = tmp_path / "broken.svs"
    bad.write_bytes(os.urandom(4096))
    assert_user_error(
        run_cli("ask", str(bad), "What is this?", cache=shared_cache, check=False), "broken.svs"
    )


def test_truncated_slide(world: Path, tmp_path: Path, shared_cache: Path):
    src = (world / "slides" / "slide_000.tif").read_bytes()
    bad = tmp_path / "truncated.tif"
    bad.write_bytes(src[: len(src) // 3])
    out = run_cli("extract", str(bad), "--cache", str(tmp_path / "c"), cache=shared_cache, check=False)
    assert_user_error(out, "truncated.tif")
    leftovers = [p for p in (tmp_path / "c").rglob("*") if p.is_dir() and p.name.startswith(".tmp")]
    assert not leftovers


def test_unsupported_format(tmp_path: Path, shared_cache: Path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not a slide")
    assert_user_error(run_cli("ask", str(bad), "What is this?", cache=shared_cache, check=False), "notes.txt")


def test_missing_file(tmp_path: Path, shared_cache: Path):
    out = run_cli("ask", str(tmp_path / "nope.svs"), "What?", cache=shared_cache, check=False)
    assert_user_error(out, "nope.svs")


def test_missing_mpp_then_explicit(tmp_path: Path, shared_cache: Path):
    import tifffile

    img = np.full((1024, 1024, 3), 230, np.uint8)
    img[200:800, 200:800] = (180, 90, 160)
    p = tmp_path / "nompp.tif"
    tifffile.imwrite(p, img, tile=(256, 256), photometric="rgb", compression="jpeg")
    assert_user_error(run_cli("ask", str(p), "What?", cache=shared_cache, check=False), "nompp.tif", "--mpp")
    out = run_cli(
        "ask", str(p), "What?", "--mpp", "0.5", "--json", "--max-new-tokens", "2", cache=shared_cache
    )
    assert json.loads(out.stdout)["scope"] == "slide"


def test_region_outside_and_empty_question(world: Path, shared_cache: Path):
    slide = str(world / "slides" / "slide_000.tif")
    out = run_cli("ask", slide, "What?", "--region", "900000,900000,10,10", cache=shared_cache, check=False)
    assert_user_error(out, "outside the slide")
    out = run_cli("ask", slide, "What?", "--region", "1,2,3", cache=shared_cache, check=False)
    assert_user_error(out, "--region")
    assert_user_error(run_cli("ask", slide, "   ", cache=shared_cache, check=False), "question is empty")


def test_bad_geojson(world: Path, tmp_path: Path, shared_cache: Path):
    slide = str(world / "slides" / "slide_000.tif")
    broken = tmp_path / "broken.geojson"
    broken.write_text("{not json")
    out = run_cli(
        "ask", slide, "What?", "--geojson", str(broken), "--id", "x", cache=shared_cache, check=False
    )
    assert_user_error(out, "broken.geojson")
    ann = world / "annotations" / "slide_000.geojson"
    out = run_cli(
        "ask", slide, "What?", "--geojson", str(ann), "--id", "no-such-id", cache=shared_cache, check=False
    )
    assert_user_error(out, "no-such-id")


def test_missing_model_and_wrong_checkpoint_layout(world: Path, tmp_path: Path, shared_cache: Path):
    slide = str(world / "slides" / "slide_000.tif")
    out = run_cli(
        "ask", slide, "What?", "--model", str(tmp_path / "no-model"), cache=shared_cache, check=False
    )
    assert_user_error(out, "no-model")
    wrong = tmp_path / "wrong-ckpt"
    wrong.mkdir()
    (wrong / "weights.bin").write_bytes(b"\0" * 16)
    out = run_cli("ask", slide, "What?", "--model", str(wrong), cache=shared_cache, check=False)
    assert_user_error(out, "wrong-ckpt")
