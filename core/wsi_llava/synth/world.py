"""``generate_world``: slides, annotations, reports and WSI-Bench-format questions in one folder.

Layout of ``out_dir``::

    manifest.json                 WorldManifest (written last: its presence means complete)
    slides/slide_000.tif          pyramidal tiled JPEG TIFF
    annotations/slide_000.geojson QuPath GeoJSON: class annotations, each inside its class's pixels
    reports/slide_000.txt         pathology-style report
    bench/<Task>_<split>.json     WSI-Bench conversation rows, one file per task

Region rows carry ``annotation_id`` and either ``region`` (a rectangle inside the annotation) or
``region: null``: the question is about the whole annotation polygon (``Preset_Questions``).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from wsi_llava.atomic import atomic_write_text
from wsi_llava.errors import WsiLlavaError
from wsi_llava.progress import CancelToken, ProgressCallback, no_progress
from wsi_llava.slide.geojson import write_geojson
from wsi_llava.slide.region import Region
from wsi_llava.synth.labels import STROMA, TISSUE_CLASSES, TUMOUR, assign_labels
from wsi_llava.synth.layout import Layout, find_rectangle, make_layout
from wsi_llava.synth.render import SlideRenderer, make_style
from wsi_llava.synth.text import (
    TASKS,
    LetterCycle,
    RegionInfo,
    annotation_questions,
    make_report,
    slide_questions,
)
from wsi_llava.synth.tiff import write_pyramid

logger = logging.getLogger(__name__)

GENERATOR_VERSION = "3"
_OUR_ENTRIES = ("manifest.json", "slides", "annotations", "reports", "bench")
_NS = uuid.UUID("6f1d3c1e-5b0a-4e55-9a43-7d2a8c1b9e01")


class SlideEntry(BaseModel):
    """One synthetic slide, its labels and ground truth (paths relative to the world folder)."""

    model_config = ConfigDict(extra="forbid")

    stem: str
    path: str
    annotations: str
    report_path: str
    width: int
    height: int
    mpp: float
    levels: int
    diagnosis: str
    grade: str
    necrosis: bool
    lymphocytes: bool
    fat: bool
    tissue_types: list[str]
    tissue_fractions: dict[str, float]
    regions: list[Region]
    report: str


class WorldManifest(BaseModel):
    """Everything ``generate_world`` made, with the parameters that made it."""

    model_config = ConfigDict(extra="forbid")

    generator_version: str = GENERATOR_VERSION
    seed: int
    n_slides: int
    size: tuple[int, int]
    mpp: float
    split: str
    tile_size: int = 256
    slides: list[SlideEntry] = Field(default_factory=list)
    bench: dict[str, str] = Field(default_factory=dict, description="task -> bench file, relative")

    def same_parameters(self, other: WorldManifest) -> bool:
        keys = ("generator_version", "seed", "n_slides", "size", "mpp", "split")
        return all(getattr(self, k) == getattr(other, k) for k in keys)


def annotation_regions(layout: Layout, seed: int, stem: str) -> list[Region]:
    """The slide's annotations as QuPath-classified regions, named ``<class> <n>``, with stable ids."""
    out = []
    counts: dict[int, int] = defaultdict(int)
    for j, p in enumerate(layout.annotations):
        tc = TISSUE_CLASSES[p.cls]
        counts[p.cls] += 1
        out.append(
            Region(
                points=p.outer,
                holes=p.holes,
                id=str(uuid.uuid5(_NS, f"{seed}/{stem}/{j}")),
                name=f"{tc.qupath_name} {counts[p.cls]}",
                properties={
                    "objectType": "annotation",
                    "classification": {"name": tc.qupath_name, "color": list(tc.color)},
                },
            )
        )
    return out


def _region_infos(layout: Layout, regions: list[Region], rng: np.random.Generator) -> list[RegionInfo]:
    """Rectangles for region questions: two for tumour and stroma, one for every other class."""
    infos = []
    by_class: dict[int, list[int]] = defaultdict(list)
    for j, p in enumerate(layout.annotations):
        by_class[p.cls].append(j)
    for c in sorted(by_class):
        idxs = sorted(by_class[c], key=lambda j: -layout.annotations[j].area_cells)
        want = 2 if c in (TUMOUR, STROMA) else 1
        for k in range(want):
            j = idxs[k % len(idxs)]
            for side in rng.permutation([256, 384, 512]):
                rect = find_rectangle(layout, j, (int(side), int(side)), rng)
                if rect is not None:
                    infos.append(RegionInfo(annotation_id=str(regions[j].id), cls=c, rect=rect))
                    break
    return infos


def _slide_rng(seed: int, index: int) -> np.random.Generator:
    """The stream slide ``index`` draws its layout, style, report and questions from, in that order."""
    return np.random.default_rng([int(seed), int(index), 1])


def slide_layout(manifest: WorldManifest, index: int) -> Layout:
    """The layout slide ``index`` of a world was painted from: its label map is the per-pixel truth."""
    labels = assign_labels(manifest.n_slides, manifest.seed)[index]
    return make_layout(labels, manifest.size[0], manifest.size[1], _slide_rng(manifest.seed, index))


def _check_out_dir(out_dir: Path, params: WorldManifest, overwrite: bool) -> WorldManifest | None:
    """The existing manifest when it matches ``params`` and is complete; else clear or refuse."""
    if out_dir.exists() and not out_dir.is_dir():
        raise WsiLlavaError(f"{out_dir}: exists and is not a folder")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return None
    mpath = out_dir / "manifest.json"
    if mpath.exists() and not overwrite:
        try:
            old = WorldManifest.model_validate_json(mpath.read_text(encoding="utf-8"))
        except ValueError:
            old = None
        if old is not None and old.same_parameters(params):
            files = (
                [s.path for s in old.slides] + [s.annotations for s in old.slides] + list(old.bench.values())
            )
            if all((out_dir / f).exists() for f in files):
                logger.info("%s: reusing the synthetic world (same parameters)", out_dir)
                return old
    if not overwrite:
        raise WsiLlavaError(
            f"{out_dir}: folder is not empty and holds no synthetic world made with the same parameters; "
            "choose an empty folder or pass overwrite=True (--overwrite)"
        )
    for name in _OUR_ENTRIES:
        p = out_dir / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    return None


def generate_world(
    out_dir: Path,
    n_slides: int,
    seed: int,
    size: tuple[int, int] = (4096, 4096),
    mpp: float = 0.5,
    split: str = "test",
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    overwrite: bool = False,
    workers: int = 1,
) -> WorldManifest:
    """Generate ``n_slides`` synthetic H&E slides with ground truth and questions; deterministic per seed.

    ``workers`` > 1 renders and writes the slides' pixels in that many processes; everything else, and
    every random draw, stays in this process in slide order, so the world is the same for any ``workers``.
    """
    out_dir = Path(out_dir)
    progress = progress or no_progress
    w, h = int(size[0]), int(size[1])
    if n_slides < 1:
        raise WsiLlavaError(f"n_slides must be at least 1, got {n_slides}")
    if w < 1024 or h < 1024 or w % 2 or h % 2:
        raise WsiLlavaError(f"size {w}x{h}: width and height must be even and at least 1024 px")
    if not (mpp > 0):
        raise WsiLlavaError(f"mpp must be positive, got {mpp}")
    if not split or any(ch in split for ch in "/\\ "):
        raise WsiLlavaError(f"split {split!r}: expected a plain name such as 'test' or 'train'")
    manifest = WorldManifest(seed=int(seed), n_slides=int(n_slides), size=(w, h), mpp=float(mpp), split=split)
    reused = _check_out_dir(out_dir, manifest, overwrite)
    if reused is not None:
        return reused
    out_dir.mkdir(parents=True, exist_ok=True)

    labels = assign_labels(n_slides, seed)
    rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
    letter_rng = np.random.default_rng([int(seed), 0x1E77E5])
    letters = defaultdict(lambda: LetterCycle(letter_rng))
    for t in TASKS:  # fixed creation order keeps the letter streams deterministic
        letters[t]
    total_steps = n_slides
    pool = None
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(min(workers, n_slides), mp_context=multiprocessing.get_context("spawn"))
    pending: dict[int, Any] = {}
    try:
        for i, lab in enumerate(labels):
            t0 = time.perf_counter()
            stem = f"slide_{i:03d}"
            rng = _slide_rng(seed, i)
            layout = make_layout(lab, w, h, rng)
            style = make_style(lab, rng)
            noise_seed = int(rng.integers(1 << 62))
            slide_rel = f"slides/{stem}.tif"
            if pool is not None:
                if cancel is not None:
                    cancel.raise_if_cancelled()
                job = (out_dir / slide_rel, lab, layout, style, noise_seed, w, h, mpp)
                pending[i] = pool.submit(_render_slide, *job)
                levels = 0  # filled in below, once the process has written the pyramid
            else:

                def on_strip(done: int, total: int, _i: int = i, _stem: str = stem) -> None:
                    if cancel is not None:
                        cancel.raise_if_cancelled()
                    progress(_i, total_steps, f"{_stem}: rendering {done}/{total}")

                renderer = SlideRenderer(lab, layout, style, noise_seed=noise_seed)
                levels = write_pyramid(out_dir / slide_rel, w, h, renderer.strip, mpp, on_strip=on_strip)
            entry = _describe_slide(out_dir, seed, i, lab, layout, rng, letters, rows, levels, mpp)
            manifest.slides.append(entry)
            if pool is None:
                logger.info("%s: %s, %s in %.1f s", stem, lab.diagnosis, lab.grade, time.perf_counter() - t0)
                progress(i + 1, total_steps, f"{stem} done")
        for n, (i, fut) in enumerate(pending.items()):
            if cancel is not None:
                cancel.raise_if_cancelled()
            manifest.slides[i].levels = fut.result()
            progress(n + 1, total_steps, f"{manifest.slides[i].stem} written")
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    for task in TASKS:
        if not rows[task]:
            continue
        rel = f"bench/{task}_{split}.json"
        (out_dir / rel).parent.mkdir(exist_ok=True)
        atomic_write_text(out_dir / rel, json.dumps(rows[task], ensure_ascii=False, indent=1))
        manifest.bench[task] = rel
    atomic_write_text(out_dir / "manifest.json", manifest.model_dump_json(indent=1))
    return manifest


def _render_slide(
    path: Path, lab: Any, layout: Layout, style: Any, noise_seed: int, w: int, h: int, mpp: float
) -> int:
    """Render and write one slide's pyramid (in a worker process); returns its number of levels."""
    renderer = SlideRenderer(lab, layout, style, noise_seed=noise_seed)
    return write_pyramid(path, w, h, renderer.strip, mpp)


def _describe_slide(
    out_dir: Path,
    seed: int,
    i: int,
    lab: Any,
    layout: Layout,
    rng: np.random.Generator,
    letters: dict[str, LetterCycle],
    rows: dict[str, list[dict[str, Any]]],
    levels: int,
    mpp: float,
) -> SlideEntry:
    """Annotations, report and questions of slide ``i``; its manifest entry (draws from ``rng`` in order)."""
    stem, w, h = f"slide_{i:03d}", layout.width, layout.height
    slide_rel = f"slides/{stem}.tif"
    regions = annotation_regions(layout, seed, stem)
    ann_rel = f"annotations/{stem}.geojson"
    (out_dir / "annotations").mkdir(exist_ok=True)
    write_geojson(out_dir / ann_rel, regions)
    report = make_report(lab, rng)
    rep_rel = f"reports/{stem}.txt"
    (out_dir / rep_rel).parent.mkdir(exist_ok=True)
    atomic_write_text(out_dir / rep_rel, report + "\n")
    infos = _region_infos(layout, regions, rng)
    counters: dict[str, int] = defaultdict(int)

    def emit(task, metadata, question, answer, extra, _stem=stem, _img=slide_rel, _c=counters):
        _c[task] += 1
        row: dict[str, Any] = {
            "id": f"{_stem}-{_c[task]}",
            "image": _img,
            "conversations": [
                {"from": "human", "value": "<image>\n" + question},
                {"from": "gpt", "value": answer},
            ],
            "metadata": metadata,
        }
        if extra:
            row.update(extra)
        rows[task].append(row)

    slide_questions(lab, report, infos, rng, letters, emit)
    # its own stream: the rows above, and the pixels, stay as they were before these questions
    annotations = [(str(r.id), p.cls) for r, p in zip(regions, layout.annotations, strict=True)]
    annotation_questions(lab, annotations, np.random.default_rng([int(seed), i, 2]), emit)
    fr = layout.fractions()
    return SlideEntry(
        stem=stem,
        path=slide_rel,
        annotations=ann_rel,
        report_path=rep_rel,
        width=w,
        height=h,
        mpp=float(mpp),
        levels=levels,
        diagnosis=lab.diagnosis,
        grade=lab.grade,
        necrosis=lab.necrosis,
        lymphocytes=lab.lymphocytes,
        fat=lab.fat,
        tissue_types=[TISSUE_CLASSES[c].key for c in lab.classes],
        tissue_fractions={TISSUE_CLASSES[c].key: round(v, 4) for c, v in fr.items()},
        regions=regions,
        report=report,
    )


def load_manifest(world_dir: Path) -> WorldManifest:
    """Read ``world_dir/manifest.json``."""
    p = Path(world_dir) / "manifest.json"
    try:
        return WorldManifest.model_validate_json(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WsiLlavaError(f"{p}: no manifest; generate the world first (wsi-llava synth)") from None
    except ValueError as e:
        raise WsiLlavaError(f"{p}: not a synthetic world manifest: {e}") from None
