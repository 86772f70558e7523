"""Describe many annotations of one slide in a batch, and the ``wsi-llava describe`` command.

Each region is asked the same question; a region that fails (outside the slide, no tissue, ...) is
reported and left unchanged while the others continue. The command reads a QuPath GeoJSON export
and writes one that QuPath imports with the answers in place; every feature, property and top-level
member it came with is preserved, features that are not polygon annotations (points, lines,
detections) are passed through untouched. With ``--evidence`` each described annotation's relevant
tiles follow as detections, replacing the ones an earlier run wrote for it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
from pydantic import BaseModel, ConfigDict

from wsi_llava.annotate import annotate_region, update_from_answer
from wsi_llava.answer import Answer
from wsi_llava.atomic import check_writable
from wsi_llava.clickutil import evidence_options, model_options
from wsi_llava.errors import AnnotationError, Cancelled, WsiLlavaError
from wsi_llava.evidence_tiles import EvidenceSelection, is_evidence_feature, replace_evidence
from wsi_llava.progress import CancelToken, ProgressCallback, no_progress
from wsi_llava.serve.options import check_server_use, explicit, server_options
from wsi_llava.slide.geojson import (
    GeoJSONFile,
    dump_geojson,
    load_geojson,
    polygon_regions,
    printable,
    region_to_feature,
    summarise,
)
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
    evidence_added: int = 0
    evidence_removed: int = 0

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
            if cancel is not None:
                cancel.raise_if_cancelled()
            result = describe_one(
                i,
                region,
                lambda r: session.ask(question, r, max_new_tokens=max_new_tokens, cancel=cancel),
                (w, h),
                overwrite=overwrite,
                set_name=set_name,
            )
            results.append(result)
            if on_result is not None:
                on_result(result)
            progress(i + 1, total, "describing annotations")
        return DescribeReport(question=question, results=results)
    finally:
        if own:
            session.close()


def describe_one(
    index: int,
    region: Region,
    ask: Callable[[Region], Answer],
    dimensions: tuple[int, int],
    *,
    overwrite: bool = False,
    set_name: bool = False,
) -> RegionResult:
    """One annotation of a batch: ``ask`` answers its question; a failure is logged and reported, not raised
    (a cancel is). Shared by :func:`describe_regions` and the server."""
    label = region_label(region, index)
    try:
        region.check_within(*dimensions, source=f"annotation {label!r}")
        answer = ask(region)
        if not answer.answer.strip():
            raise WsiLlavaError(f"annotation {label!r}: the model returned an empty answer")
        update = update_from_answer(answer, set_name=set_name)
        return RegionResult(
            index=index, label=label, region=annotate_region(region, update, overwrite), answer=answer
        )
    except (Cancelled, KeyboardInterrupt):
        raise
    except Exception as e:  # one failing annotation must not stop the batch
        msg = str(e) if isinstance(e, WsiLlavaError) else f"{type(e).__name__}: {e}"
        logger.warning("annotation %r not described: %s", label, msg)
        logger.debug("annotation %r failed", label, exc_info=True)
        return RegionResult(index=index, label=label, region=region, error=msg)


# --- GeoJSON files ---------------------------------------------------------------------------------
def _object_type(feature: Any) -> str | None:
    props = feature.get("properties") if isinstance(feature, dict) else None
    if not isinstance(props, dict):
        return None
    value = props.get("objectType", props.get("object_type", props.get("type")))
    return value.lower() if isinstance(value, str) and value.isupper() else value


def load_features(path: Path) -> tuple[GeoJSONFile, list[int], list[Region]]:
    """A QuPath GeoJSON file as parsed, the indices of the features to describe, and their Regions.

    Points, lines, features without geometry and objects that are not annotations (detections,
    cells) are left out and reported in one warning that counts them per kind.
    """
    return select_features(load_geojson(path))


def select_features(gj: GeoJSONFile) -> tuple[GeoJSONFile, list[int], list[Region]]:
    """:func:`load_features` on an already parsed collection (``gj.path`` names it in messages)."""
    path = gj.path
    if isinstance(gj.data, dict) and gj.data.get("crs") is not None:
        raise AnnotationError(
            f"{path}: has a coordinate reference system ('crs'): a map GeoJSON, not a QuPath export "
            "in slide pixels"
        )
    entries, left_out = polygon_regions(gj, skip_unsupported=True)
    keep_idx, keep_regions = [], []
    for i, region in entries:
        otype = _object_type(gj.features[i])
        if otype in DESCRIBED_TYPES:
            keep_idx.append(i)
            keep_regions.append(region)
        elif not is_evidence_feature(gj.features[i]):  # wsi-llava's own evidence tiles go unmentioned
            left_out[printable(otype)] += 1
    if left_out:
        n = sum(left_out.values())
        logger.warning(
            "%s: %d feature%s left unchanged, not polygon annotations (%s)",
            path,
            n,
            "s" * (n != 1),
            summarise(left_out),
        )
    return gj, keep_idx, keep_regions


def write_features(
    path: Path,
    gj: GeoJSONFile,
    replaced: dict[int, Region],
    evidence: Sequence[tuple[Region, Answer]] = (),
    selection: EvidenceSelection | None = None,
) -> tuple[int, int]:
    """Write ``gj`` as a FeatureCollection with the features at ``replaced``'s indices re-encoded.

    ``evidence``: described regions and their answers whose relevant tiles are written as detections
    (after the last feature), replacing those regions' earlier evidence. Returns ``(removed, added)``.
    """
    document, removed, added = described_collection(gj, replaced, evidence, selection)
    dump_geojson(path, document)
    return removed, added


def described_collection(
    gj: GeoJSONFile,
    replaced: dict[int, Region],
    evidence: Sequence[tuple[Region, Answer]] = (),
    selection: EvidenceSelection | None = None,
) -> tuple[dict[str, Any], int, int]:
    """The FeatureCollection :func:`write_features` writes, as a dict: ``(document, removed, added)``."""
    features = [region_to_feature(replaced[i]) if i in replaced else f for i, f in enumerate(gj.features)]
    removed = added = 0
    if evidence:
        features, removed, added = replace_evidence(
            features, [(r, a.evidence) for r, a in evidence], selection
        )
    return gj.collection(features), removed, added


def check_output(output: Path) -> None:
    """Raise ``AnnotationError`` unless ``output`` can be written, so no answer is computed in vain."""
    try:
        check_writable(output)
    except OSError as e:
        where = f" ({e.filename})" if e.filename and str(e.filename) != str(output) else ""
        raise AnnotationError(
            f"{output}: cannot write the output GeoJSON: {e.strerror or e}{where}; nothing was described"
        ) from None


def describe_geojson(
    slide: Any,
    geojson: Path,
    output: Path,
    question: str = DEFAULT_QUESTION,
    model: str | Path = "demo",
    *,
    evidence: EvidenceSelection | None = None,
    **kw: Any,
) -> DescribeReport:
    """Describe the annotations of a QuPath GeoJSON export and write the result to ``output``.

    ``output`` is checked for writability before any model work. Raises when nothing could be
    described (nothing is written then); otherwise writes every feature, the described ones with
    their answers. With ``evidence`` each described annotation's relevant tiles are added as
    detections, replacing the ones an earlier run added for it.
    """
    gj, idx, regions = load_features(Path(geojson))
    if not regions:
        raise AnnotationError(f"{geojson}: no polygon annotations to describe")
    check_output(Path(output))
    report = describe_regions(slide, regions, question, model, **kw)
    if report.n_ok == 0:
        reasons = "; ".join(f"{printable(r.label)}: {r.error}" for r in report.failures)
        raise WsiLlavaError(f"no annotation was described, {output} not written ({reasons})")
    ok = [r for r in report.results if r.ok]
    replaced = {idx[r.index]: r.region for r in ok}
    answered = [(r.region, r.answer) for r in ok if r.answer is not None] if evidence is not None else []
    removed, added = write_features(Path(output), gj, replaced, answered, evidence)
    return report.model_copy(update={"evidence_added": added, "evidence_removed": removed})


def describe_geojson_on_server(
    client: Any,
    slide: str,
    geojson: Path,
    output: Path,
    question: str = DEFAULT_QUESTION,
    model: str | None = None,
    *,
    overwrite: bool = False,
    set_name: bool = False,
    max_new_tokens: int | None = None,
    evidence: EvidenceSelection | None = None,
    progress: ProgressCallback | None = None,
    on_result: Callable[[RegionResult], None] | None = None,
) -> DescribeReport:
    """:func:`describe_geojson` answered by a ``wsi-llava serve`` server (a ``ServerClient``): the same
    checks first, the same file written (atomically, nothing on failure); ``slide`` as the server sees it."""
    from wsi_llava.serve.schemas import DescribeRequest, EvidenceRequest

    gj, _, regions = load_features(Path(geojson))
    if not regions:
        raise AnnotationError(f"{geojson}: no polygon annotations to describe")
    check_output(Path(output))

    def as_result(outcome: Any) -> RegionResult:
        if not 0 <= outcome.index < len(regions):
            raise WsiLlavaError(
                f"{client.url}: the server answered annotation {outcome.index}, {geojson} has {len(regions)}"
            )
        region = regions[outcome.index]
        return RegionResult(
            index=outcome.index,
            label=outcome.label,
            region=region,
            answer=outcome.answer,
            error=outcome.error,
        )

    request = DescribeRequest(
        slide=slide,
        model=model,
        features=gj.collection(gj.features),
        question=question,
        overwrite=overwrite,
        set_name=set_name,
        max_new_tokens=max_new_tokens,
        evidence=EvidenceRequest(mass=evidence.mass, max_tiles=evidence.max_tiles) if evidence else None,
    )
    shown = (lambda outcome: on_result(as_result(outcome))) if on_result is not None else None
    result = client.describe(request, on_result=shown, on_progress=progress)
    report = DescribeReport(
        question=question,
        results=[as_result(o) for o in result.results],
        evidence_added=result.evidence_added,
        evidence_removed=result.evidence_removed,
    )
    if report.n_ok == 0:
        reasons = "; ".join(f"{printable(r.label)}: {r.error}" for r in report.failures)
        raise WsiLlavaError(f"no annotation was described, {output} not written ({reasons})")
    dump_geojson(Path(output), result.features)
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
@evidence_options("to the output, after the last feature")
@server_options
@click.pass_context
def describe_command(
    ctx: click.Context,
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
    evidence: EvidenceSelection | None,
    server: str | None,
    token_file: Path | None,
    upload: bool,
) -> None:
    """Describe every annotation of a QuPath GeoJSON export; write a GeoJSON QuPath imports.

    With --server URL the annotations are answered on a `wsi-llava serve` server; the output file is the
    same. --slide is then the path as the server sees it (relative to its --slides-root), or with --upload
    a local file sent first.
    """
    from wsi_llava.progress import TerminalProgress

    check_server_use(ctx, server, token_file, upload, ("model_base", "device", "dtype", "mpp", "cache"))

    def show(result: RegionResult) -> None:
        label = printable(result.label)
        if result.ok:
            assert result.answer is not None
            click.echo(f"{label}: {result.answer.answer}")
        else:
            click.echo(f"{label}: FAILED: {result.error}", err=True)

    try:
        if server is not None:
            report = _describe_on_server(
                server, token_file, upload, slide, geojson, output, question, explicit(ctx, "model", model),
                overwrite=overwrite, set_name=set_name, max_new_tokens=max_new_tokens, evidence=evidence,
                progress=TerminalProgress(), on_result=show,
            )  # fmt: skip
        else:
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
                evidence=evidence,
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
        + (f"; {report.evidence_added} evidence tile detection(s)" if evidence is not None else "")
        + (f" replacing {report.evidence_removed} earlier one(s)" if report.evidence_removed else "")
        + f"; wrote {output}"
    )


def _describe_on_server(
    server: str, token_file: Path | None, upload: bool, slide: Path, *args: Any, **kw: Any
) -> DescribeReport:
    from wsi_llava.serve.options import open_client, server_slide

    with open_client(server, token_file) as client:
        return describe_geojson_on_server(client, server_slide(client, slide, upload), *args, **kw)
