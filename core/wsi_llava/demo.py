"""The embedded demo: a synthetic slide, the bundled demo model, a whole-slide and a region question."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

from pydantic import BaseModel

from wsi_llava.answer import Answer
from wsi_llava.progress import ProgressCallback
from wsi_llava.settings import cache_dir

logger = logging.getLogger(__name__)

DEMO_SEED = 7
DEMO_SIZE = 3072
SLIDE_QUESTION = "What tissue types are present, and what is the diagnosis?"
REGION_QUESTION = "What tissue is in this region?"


class DemoResult(BaseModel):
    slide: str
    annotations: str
    notice: str
    answers: list[Answer]


def demo_world(out: Path | None = None, progress: ProgressCallback | None = None) -> Path:
    """The folder of the demo's synthetic world, generated on first use and reused afterwards."""
    from wsi_llava.synth import generate_world

    folder = Path(out) if out is not None else cache_dir() / "demo-world"
    if not (folder / "manifest.json").exists():
        logger.info("generating the demo slide in %s", folder)
        generate_world(folder, n_slides=1, seed=DEMO_SEED, size=(DEMO_SIZE, DEMO_SIZE), progress=progress)
    return folder


def run_demo(
    out: Path | None = None,
    device: str = "auto",
    max_new_tokens: int = 64,
    on_answer: Callable[[str, Iterator[str]], None] | None = None,
    progress: ProgressCallback | None = None,
) -> DemoResult:
    """Ask the demo slide a whole-slide question and a question about its first tumour region."""
    from wsi_llava.session import SlideSession
    from wsi_llava.slide.geojson import read_geojson
    from wsi_llava.synth import load_manifest

    folder = demo_world(out, progress)
    manifest = load_manifest(folder)
    slide = manifest.slides[0]
    slide_path = folder / slide.path
    ann_path = folder / slide.annotations
    regions = read_geojson(ann_path)
    tumour = [r for r in regions if _class_name(r) == "Tumor"] or regions
    region = max(tumour, key=lambda r: r.area)

    answers: list[Answer] = []
    with SlideSession(slide_path, "demo", device=device) as session:
        session.extract(progress=progress)
        for title, question, reg in (
            ("whole slide: " + SLIDE_QUESTION, SLIDE_QUESTION, None),
            (f"region {region.name or region.id}: " + REGION_QUESTION, REGION_QUESTION, region),
        ):
            chunks = session.ask_stream(question, reg, max_new_tokens=max_new_tokens)
            if on_answer is not None:
                on_answer(title, chunks)
            else:
                for _ in chunks:
                    pass
            assert session.last_answer is not None
            answers.append(session.last_answer)
    return DemoResult(
        slide=str(slide_path), annotations=str(ann_path), notice=answers[0].notice or "", answers=answers
    )


def _class_name(region) -> str | None:
    cls = region.properties.get("classification")
    return cls.get("name") if isinstance(cls, dict) else None
