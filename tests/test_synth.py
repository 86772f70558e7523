"""The synthetic slide world: files, pyramids, labels, ground truth, bench rows, determinism."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tifffile

from wsi_llava.errors import Cancelled, WsiLlavaError
from wsi_llava.progress import CancelToken
from wsi_llava.slide.geojson import read_geojson
from wsi_llava.synth import generate_world, load_manifest
from wsi_llava.synth.labels import CLASS_BY_KEY, assign_labels
from wsi_llava.synth.layout import QUARTER, TILE
from wsi_llava.synth.text import CLOSE_ENDED
from wsi_llava.synth.world import WorldManifest, annotation_regions, slide_layout

SIZE = (2048, 2048)
N = 3


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "world"
    generate_world(out, N, seed=1, size=SIZE)
    return out


def _pixels_sha(path: Path) -> str:
    return hashlib.sha256(tifffile.imread(path, key=0).tobytes()).hexdigest()


def _rows(world: Path) -> dict[str, list[dict]]:
    m = load_manifest(world)
    return {task: json.loads((world / rel).read_text()) for task, rel in m.bench.items()}


def test_manifest_lists_every_file(world):
    m = load_manifest(world)
    assert (m.seed, m.n_slides, m.size, m.mpp, m.split) == (1, N, SIZE, 0.5, "test")
    assert [s.stem for s in m.slides] == [f"slide_{i:03d}" for i in range(N)]
    for s in m.slides:
        assert (world / s.path).is_file() and (world / s.annotations).is_file()
        assert (world / s.report_path).read_text().strip() == s.report
        assert abs(sum(s.tissue_fractions.values()) - 1) < 1e-3
        assert set(s.tissue_fractions) == set(s.tissue_types)
    for task, rel in m.bench.items():
        assert rel == f"bench/{task}_test.json"
    assert not list(world.rglob("*.tmp")), "temporary files left behind"


def test_slides_open_with_openslide_and_tifffile(world):
    import openslide

    m = load_manifest(world)
    path = world / m.slides[0].path
    with openslide.OpenSlide(str(path)) as s:
        assert s.level_dimensions == ((2048, 2048), (1024, 1024), (512, 512))
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert float(s.properties["openslide.mpp-y"]) == pytest.approx(0.5)
        region = np.asarray(s.read_region((512, 512), 0, (256, 256)).convert("RGB"))
    with tifffile.TiffFile(path) as tf:
        pages = tf.pages
        assert [p.shape[:2] for p in pages] == [(2048, 2048), (1024, 1024), (512, 512)]
        for i, p in enumerate(pages):
            assert (p.tilewidth, p.tilelength) == (256, 256)
            assert p.compression == tifffile.COMPRESSION.JPEG
            assert int(p.subfiletype) == (0 if i == 0 else 1)
            assert p.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
            xres = p.tags["XResolution"].value
            assert 1e4 / (xres[0] / xres[1]) == pytest.approx(0.5 * 2**i)
        level0 = pages[0].asarray()
    assert np.abs(level0[512:768, 512:768].astype(int) - region.astype(int)).mean() < 2
    from wsi_llava.slide import open_slide

    with open_slide(path) as reader:
        assert reader.dimensions == (2048, 2048)
        assert reader.mpp == pytest.approx(0.5)
        assert len(reader.level_dimensions) == 3


def test_labels_follow_the_rules_and_show_in_annotations(world):
    m = load_manifest(world)
    assert [s.diagnosis for s in m.slides] == [lab.diagnosis for lab in assign_labels(N, 1)]
    assert len({s.diagnosis for s in m.slides}) == 3, "3 slides cover the 3 diagnoses"
    for s in m.slides:
        classes = {r.properties["classification"]["name"] for r in read_geojson(world / s.annotations)}
        assert ("Tumor" in classes) == (s.diagnosis != "no tumour")
        assert (s.grade == "not applicable") == (s.diagnosis == "no tumour")
        assert ("Necrosis" in classes) == s.necrosis == (s.grade == "G3")
        assert ("Immune cells" in classes) == s.lymphocytes
        assert ("Fat" in classes) == s.fat
        assert "Stroma" in classes
        assert len({r.id for r in s.regions}) == len(s.regions)
        if s.diagnosis != "no tumour":
            assert s.diagnosis in s.report and s.grade in s.report
        else:
            assert "no tumour" in s.report


def _lumens(img: np.ndarray, inside: np.ndarray) -> int:
    """White holes of gland size wholly inside ``inside`` (lumens); keratin pearls are not white."""
    from scipy.ndimage import binary_erosion
    from skimage.measure import label

    core = binary_erosion(inside, iterations=8)
    lab = label((img.min(-1) > 200) & inside)
    areas = np.bincount(lab.ravel())
    touching = set(np.unique(lab[inside & ~core])) - {0}
    return sum(1 for i in range(1, len(areas)) if 150 < areas[i] < 20000 and i not in touching)


def test_tumour_pattern_is_visible(world):
    """Adenocarcinoma tumour regions hold gland lumens; squamous ones have none."""
    from skimage.draw import polygon2mask

    m = load_manifest(world)
    seen = {}
    for s in m.slides:
        if s.diagnosis == "no tumour":
            continue
        img = tifffile.imread(world / s.path, key=0)
        n = 0
        for reg in read_geojson(world / s.annotations):
            if reg.properties["classification"]["name"] == "Tumor":
                mask = polygon2mask(img.shape[:2], np.asarray(reg.points)[:, ::-1])
                n += _lumens(img, mask)
        seen[s.diagnosis] = n
        if s.diagnosis == "adenocarcinoma":
            assert n >= 3, f"{s.stem} ({s.grade}): only {n} gland lumens"
        else:
            assert n == 0, f"{s.stem}: {n} white lumens in squamous tumour"
    assert set(seen) == {"adenocarcinoma", "squamous cell carcinoma"}


def _option(row: dict) -> str:
    """The text of the option that the row's answer letter picks."""
    q = row["conversations"][0]["value"]
    letter = row["conversations"][1]["value"]
    m = re.search(rf"{letter}\) (.*?)(?: [A-D]\) |$)", q)
    assert m, q
    return m.group(1)


def test_bench_rows_match_the_wsi_bench_format(world):
    rows = _rows(world)
    assert {
        "Report",
        "Global_Morphology_Description",
        "Histological_Typing",
        "Grading",
        "Diagnosis_choice",
        "Morphology_choice",
        "Morphology_TF_question",
        "Region_Description",
        "Region_choice",
    } <= set(rows)
    letters: Counter[str] = Counter()
    for task, task_rows in rows.items():
        ids = [r["id"] for r in task_rows]
        assert len(ids) == len(set(ids)), task
        for r in task_rows:
            assert {"id", "image", "conversations", "metadata"} <= set(r)
            stem = Path(r["image"]).stem
            assert re.fullmatch(rf"{stem}-\d+", r["id"])
            assert (world / r["image"]).is_file()
            conv = r["conversations"]
            assert [c["from"] for c in conv] == ["human", "gpt"]
            assert conv[0]["value"].startswith("<image>\n") and conv[0]["value"].count("<image>") == 1
            answer = conv[1]["value"]
            assert answer.strip()
            if task in CLOSE_ENDED:
                if task == "Morphology_TF_question":
                    assert answer in ("Yes", "No")
                else:
                    assert answer in "ABCD" and len(answer) == 1
                    q = conv[0]["value"]
                    assert all(q.index(f"{a}) ") < q.index(f"{b}) ") for a, b in ("AB", "BC", "CD"))
                    letters[answer] += 1
            if r["metadata"] == "Region":
                assert {"region", "annotation_id"} <= set(r)
    total = sum(letters.values())
    assert total >= 12 and len(letters) == 4
    assert max(letters.values()) / total <= 0.4, letters
    tf = Counter(r["conversations"][1]["value"] for r in rows["Morphology_TF_question"])
    assert tf["Yes"] >= 3 and tf["No"] >= 3
    reports = {s.path: s.report for s in load_manifest(world).slides}
    assert len(rows["Report"]) == N
    for r in rows["Report"]:
        assert r["conversations"][1]["value"] == reports[r["image"]]


def test_region_rectangles_lie_in_their_class_polygon(world):
    m = load_manifest(world)
    rows = _rows(world)
    names = {
        "Tumor": "Tumour epithelium",
        "Stroma": "Fibrous stroma",
        "Necrosis": "Necrosis",
        "Immune cells": "Lymphocytic infiltrate",
        "Fat": "Adipose tissue (fat)",
    }
    asked: Counter[str] = Counter()
    for s in m.slides:
        regions = {r.id: r for r in read_geojson(world / s.annotations)}
        for task in ("Region_choice", "Region_Description"):
            for row in (r for r in rows[task] if r["image"] == s.path):
                reg = regions[row["annotation_id"]]
                x, y, w, h = (row["region"][k] for k in "xywh")
                gx, gy = np.meshgrid(np.linspace(x, x + w, 9), np.linspace(y, y + h, 9))
                assert reg.contains(gx.ravel(), gy.ravel()).all(), (s.stem, row["id"])
                others = [o for o in regions.values() if o.id != reg.id]
                assert not any(o.contains(gx.ravel(), gy.ravel()).any() for o in others)
                cls = reg.properties["classification"]["name"]
                if task == "Region_choice":
                    assert _option(row) == names[cls]
                    asked[cls] += 1
                else:
                    assert row["conversations"][1]["value"].startswith(names[cls] + ":")
    assert asked["Tumor"] >= 2 and asked["Stroma"] >= 2 * N
    assert len(asked) >= 4


def test_slide_layout_is_the_layout_the_world_was_made_from(world):
    m = load_manifest(world)
    for i, s in enumerate(m.slides):
        layout = slide_layout(m, i)
        on_disk = read_geojson(world / s.annotations)
        assert [r.points for r in annotation_regions(layout, m.seed, s.stem)] == [r.points for r in on_disk]
        assert {k: round(v, 4) for k, v in layout.fractions().items()} == {
            next(c.id for c in CLASS_BY_KEY.values() if c.key == k): v for k, v in s.tissue_fractions.items()
        }


def test_annotations_cover_their_class_only_and_never_overlap():
    """An annotation is its class: its points lie on pixels of that class, no point lies in two annotations,
    every class has one, and the tiles it selects (centre inside, as the front ends select) are mostly its class.

    Checked on the held-out world's layouts (seed 777, 2560 px), whose necrosis annotations once shared tiles
    with the tumour and stroma annotations around them.
    """
    size = 2560
    manifest = WorldManifest(seed=777, n_slides=12, size=(size, size), mpp=0.5, split="test")
    step = 16  # every 16 px: the corners and centres of any 32-px-aligned tile grid
    xs, ys = (
        v.ravel().astype(float) for v in np.meshgrid(np.arange(0, size, step), np.arange(0, size, step))
    )
    centres = np.arange(TILE // 2, size, TILE, dtype=float)
    cx, cy = (v.ravel() for v in np.meshgrid(centres, centres))
    for i, labels in enumerate(assign_labels(manifest.n_slides, manifest.seed)):
        layout = slide_layout(manifest, i)
        regions = annotation_regions(layout, manifest.seed, f"slide_{i:03d}")
        cls_of = [a.cls for a in layout.annotations]
        assert set(cls_of) == set(labels.classes), i
        covered = np.zeros(len(xs), int)
        for region, cls in zip(regions, cls_of, strict=True):
            inside = region.contains(xs, ys)
            covered += inside
            under = layout.label_q[(ys[inside] // QUARTER).astype(int), (xs[inside] // QUARTER).astype(int)]
            assert (under == cls).all(), (i, region.name, np.bincount(under, minlength=6))
            own = []
            for k in np.flatnonzero(region.contains(cx, cy)):
                x, y = (
                    int(cx[k]) // QUARTER - TILE // (2 * QUARTER),
                    int(cy[k]) // QUARTER - TILE // (2 * QUARTER),
                )
                own.append(np.mean(layout.label_q[y : y + TILE // QUARTER, x : x + TILE // QUARTER] == cls))
            assert own and np.mean(own) > 0.5, (i, region.name, own)
        assert covered.max() <= 1, (i, "a point lies in two annotations")


def test_same_seed_same_world_other_seed_differs(world, tmp_path):
    again = tmp_path / "again"
    generate_world(again, 1, seed=1, size=SIZE)  # a prefix of the fixture's world
    m0, m1 = load_manifest(world), load_manifest(again)
    for a, b in zip(m0.slides[:1], m1.slides, strict=True):
        assert _pixels_sha(world / a.path) == _pixels_sha(again / b.path)
        assert (world / a.annotations).read_bytes() == (again / b.annotations).read_bytes()
        assert a.model_dump() == b.model_dump()
    r0, r1 = _rows(world), _rows(again)
    for task, rows in r1.items():
        assert rows == [r for r in r0[task] if r["image"] == m1.slides[0].path], task
    other = tmp_path / "other"
    generate_world(other, 1, seed=2, size=SIZE)
    assert _pixels_sha(other / "slides/slide_000.tif") != _pixels_sha(world / "slides/slide_000.tif")


def test_existing_folder_is_reused_or_protected(world, tmp_path):
    before = (world / "slides/slide_000.tif").stat().st_mtime_ns
    m = generate_world(world, N, seed=1, size=SIZE)
    assert m == load_manifest(world)
    assert (world / "slides/slide_000.tif").stat().st_mtime_ns == before
    with pytest.raises(WsiLlavaError, match="not empty"):
        generate_world(world, N, seed=99, size=SIZE)
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(WsiLlavaError, match="not empty"):
        generate_world(user, 1, seed=1, size=SIZE)
    with pytest.raises(WsiLlavaError, match="size"):
        generate_world(tmp_path / "small", 1, seed=1, size=(512, 512))
    assert (user / "notes.txt").read_text() == "mine"


def test_cancel_leaves_nothing_partial(tmp_path):
    token = CancelToken()
    token.cancel()
    calls = []
    with pytest.raises(Cancelled):
        generate_world(
            tmp_path / "w", 1, seed=1, size=SIZE, cancel=token, progress=lambda *a: calls.append(a)
        )
    assert not (tmp_path / "w" / "manifest.json").exists()
    assert not list((tmp_path / "w").rglob("*.tif")) and not list((tmp_path / "w").rglob("*.tmp"))
