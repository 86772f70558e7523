"""Describe many annotations of one slide in a batch, and the ``wsi-llava describe`` command.

Each region is asked the same question; a region that fails (outside the slide, no tissue, ...) is
reported and left unchanged while the others continue. The command reads a QuPath GeoJSON export
and writes one that QuPath imports with the answers in place; every feature and property it came
with is preserved, features that are not polygons (points, lines) are passed through untouched.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
from pydantic import BaseModel, ConfigDict

from wsi_llava.annotate import annotate_region, update_from_answer
from wsi_llava.answer import Answer
from wsi_llava.clickutil import model_options
from wsi_llava.errors import AnnotationError, Cancelled, WsiLlavaError
from wsi_llava.progress import CancelToken, ProgressCallback, no_progress
from wsi_llava.slide.region import Region

logger = logging.getLogger(__name__)

DEFAULT_QUESTION = "Describe the tissue in this region."
#: QuPath object types that carry a description (others, e.g. detections, pass through unchanged)
DESCRIBED_TYPES = (None, "annotation", "PathAnnotationObject")


class RegionResult(BaseModel):
    """The outcome for one region: the annotated copy and its answer, or the error message."""

    model_config = ConfigDict(extra="forbid")

    index: int
    label: str
    region: Region
    answer: Answer | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class DescribeReport(BaseModel):
    """All results of a batch, in the order of the input regions."""

    model_config = ConfigDict(extra="forbid")

    question: str
    results: list[RegionResult]

    @property
    def n_ok(self) -> int:
        return sum(r.ok for r in self.results)

    @property
    def failures(self) -> list[RegionResult]:
        return [r for r in self.results if not r.ok]

    @property
    def warning(self) -> str | None:
        """The answers' warnings once for the whole batch (each annotation's description keeps its own)."""
        warned = [r.answer for r in self.results if r.answer is not None and r.answer.warnings]
        if not warned:
            return None
        return f"warning, {len(warned)} of {self.n_ok} described annotations: {warned[0].warnings[0]}"


def region_label(region: Region, index: int) -> str:
    """How messages name a region: its name, else its id, else its position."""
    return region.name or region.id or f"annotation {index}"


def describe_regions(
    slide: Any,
    regions: Sequence[Region],
    question: str = DEFAULT_QUESTION,
    model: str | Path = "demo",
    *,
    overwrite: bool = False,
    set_name: bool = False,
    max_new_tokens: int | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    on_result: Callable[[RegionResult], None] | None = None,
    **session_kw: Any,
) -> DescribeReport:
    """Ask ``question`` about every region of ``slide`` (a ``SlideSession``, or a path opened with ``model``).

    Returns every region, annotated where its answer succeeded and unchanged where it failed; a
    failure is logged and reported, the batch goes on. ``on_result`` sees each result as it lands.
    """
    from wsi_llava.session import SlideSession

    if not question or not question.strip():
        raise WsiLlavaError("question is empty: type a question for the annotations")
    progress = progress or no_progress
    own = not isinstance(slide, SlideSession)
    session = SlideSession(slide, model, **session_kw) if own else slide
    try:
        w, h = session.reader.dimensions
        total = len(regions)
        results: list[RegionResult] = []
        progress(0, total, "describing annotations")
        for i, region in enumerate(regions):
            label = region_label(region, i)
            if cancel is not None:
                cancel.raise_if_cancelled()
            try:
                region.check_within(w, h, source=f"annotation {label!r}")
                answer = session.ask(question, region, max_new_tokens=max_new_tokens, cancel=cancel)
                if not answer.answer.strip():
                    raise WsiLlavaError(f"annotation {label!r}: the model returned an empty answer")
                update = update_from_answer(answer, set_name=set_name)
                result = RegionResult(
                    index=i, label=label, region=annotate_region(region, update, overwrite), answer=answer
                )
            except (Cancelled, KeyboardInterrupt):
                raise
            except Exception as e:  # one failing annotation must not stop the batch
                msg = str(e) if isinstance(e, WsiLlavaError) else f"{type(e).__name__}: {e}"
                logger.warning("annotation %r not described: %s", label, msg)
                logger.debug("annotation %r failed", label, exc_info=True)
                result = RegionResult(index=i, label=label, region=region, error=msg)
            results.append(result)
            if on_result is not None:
                on_result(result)
            progress(i + 1, total, "describing annotations")
        return DescribeReport(question=question, results=results)
    finally:
        if own:
            session.close()


# --- GeoJSON files ---------------------------------------------------------------------------------
def _raw_features(path: Path) -> list[Any]:
    """The features of a GeoJSON file as parsed JSON (read_geojson has validated the file already)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict) and data.get("crs") is not None:
        raise AnnotationError(
            f"{path}: has a coordinate reference system ('crs'): a map GeoJSON, not a QuPath export "
            "in slide pixels"
        )
    if isinstance(data, list):
        return data
    if data.get("type") == "FeatureCollection":
        return data["features"]
    return [data]


def _geometry_type(feature: Any) -> str | None:
    geometry = feature.get("geometry") if isinstance(feature, dict) else None
    return geometry.get("type") if isinstance(geometry, dict) else None


def _object_type(feature: Any) -> str | None:
    props = feature.get("properties") if isinstance(feature, dict) else None
    if not isinstance(props, dict):
        return None
    value = props.get("objectType", props.get("object_type", props.get("type")))
    return value.lower() if isinstance(value, str) and value.isupper() else value


def load_features(path: Path) -> tuple[list[Any], list[int], list[Region]]:
    """The raw features of a QuPath GeoJSON file, the indices of those to describe, and their Regions.

    Points, lines and non-annotation objects are reported and left out of the describe list.
    """
    from wsi_llava.slide.geojson import read_geojson

    regions = read_geojson(path, skip_unsupported=True)
    raw = _raw_features(path)
    polygon_idx = [i for i, f in enumerate(raw) if _geometry_type(f) in ("Polygon", "MultiPolygon")]
    if len(polygon_idx) != len(regions):  # pragma: no cover - read_geojson keeps exactly the polygons
        raise AnnotationError(f"{path}: could not match the polygon features to annotations")
    keep_idx, keep_regions = [], []
    for i, region in zip(polygon_idx, regions, strict=True):
        otype = _object_type(raw[i])
        if otype in DESCRIBED_TYPES:
            keep_idx.append(i)
            keep_regions.append(region)
        else:
            logger.warning(
                "%s: feature %d (%s) is a %s, not an annotation: left unchanged",
                path,
                i,
                region_label(region, i),
                otype,
            )
    skipped = len(raw) - len(polygon_idx)
    if skipped:
        logger.warning("%s: %d point/line feature(s) skipped (only polygons are described)", path, skipped)
    return raw, keep_idx, keep_regions


def write_features(path: Path, raw: list[Any], replaced: dict[int, Region]) -> None:
    """Write ``raw`` as a FeatureCollection with the features at ``replaced``'s indices re-encoded."""
    import os
    import tempfile

    from wsi_llava.slide.geojson import region_to_feature

    features = [region_to_feature(replaced[i]) if i in replaced else f for i, f in enumerate(raw)]
    data = {"type": "FeatureCollection", "features": features}
    directory = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, allow_nan=False)
        os.replace(tmp, path)
    except (OSError, ValueError) as e:
        raise AnnotationError(f"{path}: cannot write GeoJSON: {e}") from None


def describe_geojson(
    slide: Any,
    geojson: Path,
    output: Path,
    question: str = DEFAULT_QUESTION,
    model: str | Path = "demo",
    **kw: Any,
) -> DescribeReport:
    """Describe the annotations of a QuPath GeoJSON export and write the result to ``output``.

    Raises when nothing could be described (nothing is written then); otherwise writes every
    feature, the described ones with their answers.
    """
    raw, idx, regions = load_features(Path(geojson))
    if not regions:
        raise AnnotationError(f"{geojson}: no polygon annotations to describe")
    report = describe_regions(slide, regions, question, model, **kw)
    if report.n_ok == 0:
        reasons = "; ".join(f"{r.label}: {r.error}" for r in report.failures)
        raise WsiLlavaError(f"no annotation was described, {output} not written ({reasons})")
    replaced = {idx[r.index]: r.region for r in report.results if r.ok}
    write_features(Path(output), raw, replaced)
    return report


@click.command("describe")
@click.option(
    "--slide", required=True, type=click.Path(path_type=Path), help="The slide the annotations are on."
)
@click.option(
    "--geojson", required=True, type=click.Path(path_type=Path), help="QuPath GeoJSON export (annotations)."
)
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="GeoJSON to write.")
@click.option("--question", default=DEFAULT_QUESTION, show_default=True, help="Asked about each annotation.")
@click.option("--overwrite", is_flag=True, help="Replace existing descriptions instead of appending.")
@click.option("--name/--no-name", "set_name", default=False, help="Also set a short name from the answer.")
@model_options()
@click.option("--max-new-tokens", type=int, help="Longest answer in tokens.")
@click.option("--mpp", type=float, help="µm/px of level 0 for files that record none.")
@click.option("--cache", type=click.Path(path_type=Path), help="Cache folder (default ~/.cache/wsi-llava).")
def describe_command(
    slide: Path,
    geojson: Path,
    output: Path,
    question: str,
    overwrite: bool,
    set_name: bool,
    model: str,
    model_base: Path | None,
    device: str,
    dtype: str | None,
    max_new_tokens: int | None,
    mpp: float | None,
    cache: Path | None,
) -> None:
    """Describe every annotation of a QuPath GeoJSON export; write a GeoJSON QuPath imports."""
    from wsi_llava.progress import TerminalProgress

    def show(result: RegionResult) -> None:
        if result.ok:
            assert result.answer is not None
            click.echo(f"{result.label}: {result.answer.answer}")
        else:
            click.echo(f"{result.label}: FAILED: {result.error}", err=True)

    try:
        report = describe_geojson(
            slide,
            geojson,
            output,
            question,
            model,
            overwrite=overwrite,
            set_name=set_name,
            max_new_tokens=max_new_tokens,
            progress=TerminalProgress(),
            on_result=show,
            mpp=mpp,
            cache_dir=cache,
            device=device,
            dtype=dtype,
            model_base=model_base,
        )
    except Cancelled as e:
        raise click.ClickException(f"cancelled: {e}") from None
    except WsiLlavaError as e:
        raise click.ClickException(str(e)) from None
    notice = next((r.answer.notice for r in report.results if r.answer and r.answer.notice), None)
    if notice:
        click.echo(f"[{notice}]", err=True)
    if report.warning:
        click.echo(f"[{report.warning}]", err=True)
    failed = len(report.failures)
    click.echo(
        f"described {report.n_ok} of {len(report.results)} annotations"
        + (f" ({failed} failed, left unchanged)" if failed else "")
        + f"; wrote {output}"
    )
