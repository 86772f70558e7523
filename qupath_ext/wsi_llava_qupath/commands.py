"""``wsi-llava qupath status | describe | ask``: questions about the image and annotations open in QuPath."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from wsi_llava.clickutil import UserErrorGroup, evidence_options, model_options
from wsi_llava.errors import WsiLlavaError
from wsi_llava.evidence_tiles import EvidenceSelection, relevant_tiles
from wsi_llava.serve.options import check_server_use, explicit, server_options
from wsi_llava_qupath.bridge import (
    CALL_TIMEOUT,
    CONNECT_TIMEOUT,
    DEFAULT_PORT,
    QuPathAnnotation,
    QuPathBridge,
    QuPathError,
    connect,
    status_within,
)
from wsi_llava_qupath.sink import deliver

logger = logging.getLogger(__name__)

DESCRIBE_QUESTION = "Describe the tissue in this region."


@dataclass(frozen=True)
class AskOptions:
    """The model and write-back options of ``describe`` and ``ask`` (their click options, by name)."""

    model: str | None  # None: the server's default model (with --server)
    max_new_tokens: int | None
    mpp: float | None
    cache: Path | None
    device: str
    overwrite: bool
    set_name: bool
    dtype: str | None = None
    model_base: Path | None = None
    evidence: EvidenceSelection | None = None
    server: str | None = None
    token_file: Path | None = None
    upload: bool = False
    slide: str | None = None

    def context(self, bridge: QuPathBridge, annotation: QuPathAnnotation | None) -> dict[str, Any]:
        """The result sinks' context for an answer about ``annotation`` (None: the whole image)."""
        return {
            "frontend": "qupath",
            "qupath_bridge": bridge,
            "qupath_annotation": annotation,
            "overwrite": self.overwrite,
            "set_name": self.set_name,
            "refresh": annotation is None,  # region answers: one refresh after the last
            "evidence": self.evidence,
        }

    def evidence_note(self, answer: Any) -> str:
        """`` [N evidence tiles]`` when evidence detections were asked for, else nothing."""
        if self.evidence is None:
            return ""
        return f" [{len(relevant_tiles(answer.evidence, self.evidence))} evidence tiles]"


def _connection_options(fn):
    fn = click.option(
        "--token",
        envvar="WSI_LLAVA_QUPATH_TOKEN",
        help="Auth token set when the gateway was started in QuPath ($WSI_LLAVA_QUPATH_TOKEN).",
    )(fn)
    fn = click.option(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        show_default=True,
        envvar="WSI_LLAVA_QUPATH_PORT",
        help="Port of QuPath's Python (py4j) gateway.",
    )(fn)
    return fn


_call_timeout_option = click.option(
    "--timeout",
    "call_timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=CALL_TIMEOUT,
    show_default=True,
    help="Seconds each call to QuPath may wait for its reply once connected (the pixels of a large region "
    "take longest); a QuPath that stops answering ends the command with an error.",
)


def _model_options(fn):
    for opt in reversed(
        [
            model_options(),
            click.option("--max-new-tokens", type=int, help="Longest answer in tokens."),
            click.option("--mpp", type=float, help="µm/px when QuPath's image has no pixel size."),
            click.option("--cache", type=click.Path(path_type=Path), help="Cache folder."),
            click.option("--overwrite", is_flag=True, help="Replace descriptions instead of appending."),
            click.option("--name/--no-name", "set_name", default=False, help="Also set a short name."),
            evidence_options("below the annotation (a whole-slide answer: below its new annotation)"),
            server_options,
            click.option(
                "--slide",
                help="With --server: the image's path as the server sees it (relative to its --slides-root). "
                "Default: QuPath's image file as this computer sees it, or with --upload that file.",
            ),
        ]
    ):
        fn = opt(fn)
    return fn


#: options that only matter where the model runs (a server brings its own)
_SERVER_IGNORES = ("model_base", "device", "dtype", "cache", "mpp")


def _options(kw: dict[str, Any]) -> AskOptions:
    """The command's :class:`AskOptions`; with --server, local-only options are refused and --model is
    sent only when given (else the server's default model answers)."""
    ctx = click.get_current_context()
    check_server_use(ctx, kw["server"], kw["token_file"], kw["upload"], _SERVER_IGNORES)
    if kw["server"] is None and kw["slide"] is not None:
        raise click.UsageError("--slide goes with --server (here QuPath's own image is read)")
    if kw["server"] is not None:
        kw = {**kw, "model": explicit(ctx, "model", kw["model"])}
    return AskOptions(**kw)


@click.group("qupath", cls=UserErrorGroup)
def qupath() -> None:
    """Ask about the image open in QuPath; answers are written into its annotations."""


@qupath.command()
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=CONNECT_TIMEOUT,
    show_default=True,
    help="Seconds to wait in all for QuPath's answer.",
)
@_connection_options
def status(port: int, token: str | None, timeout: float) -> None:
    """Connected? Which image? How many annotations, how many selected?"""
    st = status_within(port, token, timeout)
    click.echo(f"connected to QuPath on port {st.port} (py4j extension {st.extension_version or 'unknown'})")
    if st.image is None:
        click.echo("image: none open")
        return
    im = st.image
    where = str(im.local_path) if im.local_path else "not reachable from here: pixels come through QuPath"
    mpp = f"{im.mpp:g} µm/px" if im.mpp else "no pixel size"
    click.echo(f"image: {im.server_path} ({im.width} x {im.height} px, {mpp}; file: {where})")
    click.echo(f"annotations: {st.n_annotations}, selected: {st.n_selected}")


def open_session(bridge: QuPathBridge, opts: AskOptions):
    """A SlideSession on QuPath's image: its file when reachable, else its pixels over the gateway."""
    from wsi_llava.session import SlideSession
    from wsi_llava.settings import cache_dir
    from wsi_llava_qupath.reader import write_pointer

    kw = {
        "mpp": opts.mpp,
        "cache_dir": opts.cache,
        "device": opts.device,
        "dtype": opts.dtype,
        "model_base": opts.model_base,
    }
    info = bridge.image_info()
    if info.local_path is not None:
        return SlideSession(info.local_path, opts.model, **kw)
    pointer = write_pointer(bridge, cache_dir(opts.cache) / "qupath")
    logger.info("%s is not reachable here: reading pixels through QuPath", info.server_path)
    return SlideSession(pointer, opts.model, reader="qupath", **kw)


def _annotations(bridge: QuPathBridge, scope: str) -> list[QuPathAnnotation]:
    anns = bridge.annotations(selected=scope == "selected")
    if not anns:
        if scope == "selected":
            raise QuPathError(
                "nothing selected in QuPath: select one or more area annotations (or pass --all)"
            )
        raise QuPathError("the image in QuPath has no area annotations: draw one, or ask --whole-slide")
    return anns


def _report_failures(failures: list[str]) -> None:
    for message in failures:
        click.echo(f"[{message}]", err=True)


@contextmanager
def server_for(bridge: QuPathBridge, opts: AskOptions) -> Iterator[tuple[Any, str]]:
    """``(ServerClient, the image's slide name on the server)`` for ``--server``: ``--slide`` as given, else
    QuPath's image file (uploaded first with ``--upload``)."""
    from wsi_llava.serve.options import open_client, server_slide

    assert opts.server is not None
    slide: str | None = opts.slide
    if slide is None:
        info = bridge.image_info()
        if info.local_path is None:
            raise QuPathError(
                f"{info.server_path}: QuPath's image is not a file on this computer: give --slide PATH as the "
                "server sees it (relative to its --slides-root)"
            )
        slide = str(info.local_path)
    with open_client(opts.server, opts.token_file) as client:
        yield client, server_slide(client, slide, opts.upload)


def _describe_on_server(
    bridge: QuPathBridge,
    anns: list[QuPathAnnotation],
    question: str,
    opts: AskOptions,
    on_result: Callable[[Any], None],
) -> Any:
    """The annotations answered by ``/v1/describe`` (QuPath's own GeoJSON of them), each answer handed to
    ``on_result`` as it lands: the same ``DescribeReport`` as a local run."""
    from wsi_llava.describe import DescribeReport, RegionResult
    from wsi_llava.progress import TerminalProgress
    from wsi_llava.serve.schemas import DescribeRequest, EvidenceRequest
    from wsi_llava.slide.geojson import region_to_feature

    def as_result(outcome: Any) -> RegionResult:
        if not 0 <= outcome.index < len(anns):
            raise QuPathError(f"{opts.server}: the server answered annotation {outcome.index} of {len(anns)}")
        return RegionResult(
            index=outcome.index,
            label=outcome.label,
            region=anns[outcome.index].region,
            answer=outcome.answer,
            error=outcome.error,
        )

    features = {"type": "FeatureCollection", "features": [region_to_feature(a.region) for a in anns]}
    with server_for(bridge, opts) as (client, slide):
        # the evidence pass runs as it does here (the tile counts written back come from it); the server's
        # detections in its reply are not used: the sink writes the answers' own into QuPath
        selection = opts.evidence or EvidenceSelection()
        request = DescribeRequest(
            slide=slide,
            model=opts.model,
            features=features,
            question=question,
            max_new_tokens=opts.max_new_tokens,
            evidence=EvidenceRequest(mass=selection.mass, max_tiles=selection.max_tiles),
        )
        result = client.describe(
            request, on_result=lambda o: on_result(as_result(o)), on_progress=TerminalProgress()
        )
    return DescribeReport(question=question, results=[as_result(o) for o in result.results])


def run_annotations(
    bridge: QuPathBridge, anns: list[QuPathAnnotation], question: str, opts: AskOptions
) -> tuple[int, int]:
    """Answer ``question`` for each annotation (here, or on ``--server``) and hand each answer to the result
    sinks at once (the QuPath sink writes it back); (ok, failed)."""
    from wsi_llava.describe import RegionResult, describe_regions
    from wsi_llava.progress import TerminalProgress

    def on_result(result: RegionResult) -> None:
        ann = anns[result.index]
        if result.ok:
            assert result.answer is not None
            try:
                _report_failures(deliver(result.answer, opts.context(bridge, ann)))
            except WsiLlavaError as e:
                result.error = f"answer not written: {e}"
        if result.ok:
            click.echo(f"{result.label}: {result.answer.answer}{opts.evidence_note(result.answer)}")
        else:
            click.echo(f"{result.label}: FAILED: {result.error}", err=True)

    if opts.server is not None:
        report = _describe_on_server(bridge, anns, question, opts, on_result)
    else:
        with open_session(bridge, opts) as session:
            session.extract(progress=TerminalProgress())
            report = describe_regions(
                session,
                [a.region for a in anns],
                question,
                max_new_tokens=opts.max_new_tokens,
                progress=TerminalProgress(),
                on_result=on_result,
            )
    ok = sum(r.ok for r in report.results)
    if ok:
        bridge.refresh()
    notice = next((r.answer.notice for r in report.results if r.answer and r.answer.notice), None)
    if notice:
        click.echo(f"[{notice}]", err=True)
    if report.warning:
        click.echo(f"[{report.warning}]", err=True)
    return ok, len(report.results) - ok


def _finish(ok: int, failed: int) -> None:
    if ok == 0:
        raise QuPathError(f"no annotation was answered ({failed} failed); nothing in QuPath was changed")
    click.echo(
        f"answered {ok} annotation(s) in QuPath" + (f"; {failed} failed, left unchanged" if failed else "")
    )


@qupath.command()
@click.option(
    "--selected", "scope", flag_value="selected", default=True, help="Selected annotations (default)."
)
@click.option("--all", "scope", flag_value="all", help="Every area annotation of the image.")
@click.option("--question", default=DESCRIBE_QUESTION, show_default=True)
@_model_options
@_connection_options
@_call_timeout_option
def describe(scope: str, question: str, port: int, token: str | None, call_timeout: float, **kw: Any) -> None:
    """Write a generated description into each selected annotation (answered here, or on --server)."""
    opts = _options(kw)
    bridge = connect(port, token, call_timeout=call_timeout)
    try:
        anns = _annotations(bridge, scope)
        _finish(*run_annotations(bridge, anns, question, opts))
    finally:
        bridge.close()


@qupath.command()
@click.argument("question")
@click.option(
    "--selected", "scope", flag_value="selected", default=True, help="Selected annotations (default)."
)
@click.option("--all", "scope", flag_value="all", help="Every area annotation of the image.")
@click.option(
    "--whole-slide", "scope", flag_value="slide", help="The whole image; the answer becomes a new annotation."
)
@_model_options
@_connection_options
@_call_timeout_option
def ask(question: str, scope: str, port: int, token: str | None, call_timeout: float, **kw: Any) -> None:
    """Ask QUESTION about each selected annotation, or about the whole image (answered here, or on --server)."""
    if not question.strip():
        raise QuPathError("question is empty: type a question about the slide or the annotations")
    opts = _options(kw)
    bridge = connect(port, token, call_timeout=call_timeout)
    try:
        if scope != "slide":
            anns = _annotations(bridge, scope)
            _finish(*run_annotations(bridge, anns, question, opts))
            return
        _ask_whole_slide(bridge, question, opts)
    finally:
        bridge.close()


def _ask_whole_slide(bridge: QuPathBridge, question: str, opts: AskOptions) -> None:
    """Answer about the whole image; the QuPath sink adds it as a new whole-image annotation."""
    from wsi_llava.progress import TerminalProgress

    if opts.server is not None:
        from wsi_llava.serve.schemas import AskRequest

        with server_for(bridge, opts) as (client, slide):
            request = AskRequest(
                slide=slide, model=opts.model, question=question, max_new_tokens=opts.max_new_tokens
            )
            answer = client.ask(request, on_progress=TerminalProgress())
    else:
        with open_session(bridge, opts) as session:
            session.extract(progress=TerminalProgress())
            answer = session.ask(question, max_new_tokens=opts.max_new_tokens)
    click.echo(answer.answer)
    if answer.notice:
        click.echo(f"[{answer.notice}]", err=True)
    for warning in answer.warnings:
        click.echo(f"[warning: {warning}]", err=True)
    _report_failures(deliver(answer, opts.context(bridge, None)))
    click.echo("added a whole-image annotation with the answer to QuPath" + opts.evidence_note(answer))
