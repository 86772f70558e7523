"""The ``wsi-llava`` command: synth, extract, ask, models, demo (+ commands from plugins)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from wsi_llava.clickutil import UserErrorGroup, generation_options, generation_setting, model_options
from wsi_llava.errors import WsiLlavaError
from wsi_llava.progress import TerminalProgress
from wsi_llava.serve.options import check_server_use, explicit, server_options

logger = logging.getLogger("wsi_llava")

MPP_HELP = (
    "µm/px of level 0, for files that record none or an implausible one (outside 0.05–50): "
    "0.001–1000 accepted, with a warning outside 0.05–50."
)


class OwnProcess:
    """``ctx.obj`` of a ``wsi-llava`` process started by :func:`main`: the commands that own the whole
    process (built-in ones and the QuPath bridge's), which start it without transformers' vision imports
    (:mod:`wsi_llava.startup`). Commands invoked from Python (tests, ``CliRunner``) get no such object."""

    def __init__(self, commands: set[str]) -> None:
        self.commands = commands


@click.group(cls=UserErrorGroup)
@click.version_option(package_name="wsi-llava")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.pass_context
def cli(ctx: click.Context, verbose: int) -> None:
    """WSI-LLaVA: ask questions about whole slide images and regions of them."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if isinstance(ctx.obj, OwnProcess) and ctx.invoked_subcommand in ctx.obj.commands:
        from wsi_llava.startup import text_only_transformers

        text_only_transformers()


@cli.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--n-slides", default=4, show_default=True, help="Number of slides to generate.")
@click.option("--seed", default=0, show_default=True, help="Random seed (same seed, same world).")
@click.option("--size", default=4096, show_default=True, help="Level-0 width and height in pixels.")
@click.option("--mpp", default=0.5, show_default=True, help="Microns per level-0 pixel.")
@click.option("--split", default="test", show_default=True, help="Name of the bench split (file suffix).")
@click.option("--overwrite", is_flag=True, help="Replace an existing world in OUT.")
@click.option(
    "--workers", default=1, show_default=True, help="Processes rendering slides (the world is the same)."
)
def synth(
    out: Path, n_slides: int, seed: int, size: int, mpp: float, split: str, overwrite: bool, workers: int
) -> None:
    """Generate synthetic pyramidal slides with ground truth, reports and WSI-Bench-format questions."""
    from wsi_llava.synth import generate_world

    manifest = generate_world(
        out,
        n_slides=n_slides,
        seed=seed,
        size=(size, size),
        mpp=mpp,
        split=split,
        overwrite=overwrite,
        progress=TerminalProgress(),
        workers=workers,
    )
    for s in manifest.slides:
        click.echo(f"{s.path}\t{s.diagnosis}\t{s.grade}")
    click.echo(f"wrote {len(manifest.slides)} slides, annotations, reports and bench files under {out}")


@cli.command()
@click.argument("slides", nargs=-1, type=click.Path(path_type=Path))
@click.option(
    "--list",
    "list_file",
    type=click.Path(path_type=Path),
    help="Text file of slide paths, one a line (relative to the file; # comments).",
)
@click.option(
    "--model",
    help="Featurize as this model does (its tile encoder and tiling): the features `ask --model` reads. "
    "Built-in or registered name, or a checkpoint folder. Default: demo (unless --encoder).",
)
@click.option(
    "--encoder",
    help="Instead of a model's, a bare registered tile encoder (e.g. demo-vit: random unless --weights), "
    "for features of your own; `ask` does not read them.",
)
@click.option("--weights", type=click.Path(path_type=Path), help="Local weights file for --encoder.")
@click.option(
    "--cache", "cache", type=click.Path(path_type=Path), help="Cache folder (default ~/.cache/wsi-llava)."
)
@click.option("--target-mpp", type=float, help="Tile resolution in µm/px with --encoder (default 0.5).")
@click.option(
    "--tile-size", type=int, help="Tile edge in pixels at --target-mpp with --encoder (default 256)."
)
@click.option("--mpp", type=float, help=MPP_HELP)
@click.option(
    "--device", default="auto", show_default=True, help="auto, cpu, cuda (cuda:LOCAL_RANK under torchrun)."
)
@click.option(
    "--batch-size",
    type=int,
    default=None,
    help="Tiles per batch (default: 256 on the GPU fast path, else 64).",
)
@click.option("--workers", default=2, show_default=True, help="Tile-reading threads per process.")
@click.option(
    "--summary",
    type=click.Path(path_type=Path),
    help="Write the outcomes and per-rank timings (claimed slides) as JSON (rank 0 under torchrun).",
)
def extract(
    slides: tuple[Path, ...],
    list_file: Path | None,
    model: str | None,
    encoder: str | None,
    weights: Path | None,
    cache: Path | None,
    target_mpp: float | None,
    tile_size: int | None,
    mpp: float | None,
    device: str,
    batch_size: int | None,
    workers: int,
    summary: Path | None,
) -> None:
    """Extract and cache tile features for slides, folders of slides or a --list file.

    Launched with ``torchrun --nproc-per-node N -m wsi_llava.cli extract ...`` each process claims
    slides one at a time, largest first, on its own GPU. A slide that fails is reported and skipped.
    """
    from wsi_llava.features.cache import FeatureCache
    from wsi_llava.features.cohort import DistEnv, extract_cohort, list_slides
    from wsi_llava.settings import cache_dir

    if not slides and list_file is None:
        raise click.UsageError("give slide files, folders of slides, or --list FILE")
    env = DistEnv.from_env()
    paths = list_slides(slides, list_file)
    enc, target_mpp, tile_size = _extract_encoder(model, encoder, weights, target_mpp, tile_size, device)
    store = FeatureCache(cache_dir(cache) / "features")
    report = extract_cohort(
        paths,
        enc,
        store,
        env=env,
        device=device,
        target_mpp=target_mpp,
        tile_size=tile_size,
        mpp=mpp,
        batch_size=batch_size,
        workers=workers,
        progress=TerminalProgress(),
    )
    if env.rank != 0:
        return  # rank 0 prints and writes the whole cohort's results
    for o in report.succeeded:
        click.echo(f"{o.path}\t{o.n_tiles} tiles\t{o.dim}-d\t{o.cache_path}")
    if summary is not None:
        summary.parent.mkdir(parents=True, exist_ok=True)
        summary.write_text(json.dumps(report.model_dump(), indent=1) + "\n")
    if len(report.outcomes) > 1 or env.distributed:
        click.echo(
            f"{len(report.succeeded)} of {len(report.outcomes)} slides extracted"
            f" in {report.wall_seconds:.1f} s on {report.world_size} process(es)",
            err=True,
        )
    if report.failed:
        raise WsiLlavaError(report.error_summary())


def _extract_encoder(
    model: str | None,
    encoder: str | None,
    weights: Path | None,
    target_mpp: float | None,
    tile_size: int | None,
    device: str,
):
    """``(tile encoder, target µm/px, tile size)`` for ``extract``: a model's own (default: demo), or a bare
    ``--encoder``. A model's features are keyed as ``ask`` looks them up, so its answers read them."""
    if encoder is None:
        if weights is not None:
            raise click.UsageError("--weights goes with --encoder (a model brings its own weights)")
        from wsi_llava.model import load_tile_encoder
        from wsi_llava.model.build import own_tile_encoder
        from wsi_llava.session import inference_tile_encoder
        from wsi_llava.settings import resolve_device

        enc, spec = load_tile_encoder(model or "demo")
        for option, value, own in (
            ("--target-mpp", target_mpp, spec.tiling.target_mpp),
            ("--tile-size", tile_size, spec.tiling.tile_size),
        ):
            if value is not None and value != own:
                raise click.UsageError(
                    f"{option} {value:g}: model {model or 'demo'!r} tiles at {own:g}, and `ask` reads only its "
                    f"own tiling; leave {option} out (or featurize with a bare --encoder)"
                )
        enc = inference_tile_encoder(enc, resolve_device(device), separate=not own_tile_encoder(spec))
        return enc.eval(), spec.tiling.target_mpp, spec.tiling.tile_size
    if model is not None:
        raise click.UsageError("use either --model (a model's tile encoder) or --encoder (a bare one)")
    from wsi_llava.features.tile import build_tile_encoder

    enc = build_tile_encoder(encoder, weights=weights).eval()
    return enc, 0.5 if target_mpp is None else target_mpp, 256 if tile_size is None else tile_size


@cli.command()
@click.argument("slide", required=False)
@click.argument("question", required=False)
@click.option("--region", help="Level-0 rectangle x,y,w,h.")
@click.option("--geojson", type=click.Path(path_type=Path), help="QuPath GeoJSON with annotations.")
@click.option("--id", "annotation_id", help="Annotation id or name in --geojson.")
@click.option(
    "--index",
    "annotation_index",
    type=click.IntRange(min=0),
    help="Annotation by its feature position in --geojson (0 = first), for files without ids or names.",
)
@click.option(
    "--features",
    type=click.Path(path_type=Path),
    help="Ask about precomputed visual tokens (a released WSI-Bench .pt, 576 x 1024) instead of a slide.",
)
@model_options()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
@click.option("--cache", type=click.Path(path_type=Path), help="Cache folder (default ~/.cache/wsi-llava).")
@click.option("--mpp", type=float, help=MPP_HELP)
@click.option(
    "--evidence-png",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also write the slide's thumbnail with the answer's relevance map over it (one cell per tile, "
    "colour and opacity by relevance, the most relevant tile = 1) and the region's outline, as a PNG.",
)
@generation_options
@server_options
@click.pass_context
def ask(
    ctx: click.Context,
    slide: str | None,
    question: str | None,
    region: str | None,
    geojson: Path | None,
    annotation_id: str | None,
    annotation_index: int | None,
    features: Path | None,
    model: str,
    model_base: Path | None,
    device: str,
    dtype: str | None,
    as_json: bool,
    cache: Path | None,
    mpp: float | None,
    evidence_png: Path | None,
    max_new_tokens: int | None,
    temperature: float | None,
    server: str | None,
    token_file: Path | None,
    upload: bool,
) -> None:
    """Ask QUESTION about SLIDE: the whole slide, a rectangle (--region) or an annotation (--geojson/--id/--index).

    With --features FILE.pt the question is asked about precomputed visual tokens: `ask --features F.pt "..."`.

    With --server URL the question is answered on a `wsi-llava serve` server and streamed here (--json prints
    the same object). SLIDE is then the path as the server sees it (relative to its --slides-root); add
    --upload to send a local file first. --geojson and --evidence-png read local files.
    """
    check_server_use(ctx, server, token_file, upload, SERVER_IGNORES)
    if features is not None:
        if question is not None:
            raise click.UsageError("with --features give only the QUESTION, not a slide")
        question, slide = slide, None
    if question is None or slide is None and features is None:
        raise click.UsageError("give a SLIDE and a QUESTION (or --features FILE.pt and a QUESTION)")
    from wsi_llava.model.templates import check_text

    if not check_text(question).strip():
        raise WsiLlavaError("question is empty: type a question about the slide or region")
    kw = {"max_new_tokens": max_new_tokens, "temperature": temperature}
    if features is not None:
        if region or geojson or annotation_id or annotation_index is not None or evidence_png:
            raise WsiLlavaError(
                "--region / --geojson / --evidence-png need a slide: precomputed tokens have no tile positions"
            )
        if server is not None:
            raise click.UsageError("--features is answered on this computer, not with --server")
        answer = _ask_features(features, question, model, model_base, device, dtype, as_json, cache, **kw)
    else:
        if evidence_png is not None:
            from wsi_llava.evidence_image import check_png_path

            check_png_path(evidence_png)  # before any model work
        reg = _region_from_options(region, geojson, annotation_id, annotation_index)
        if server is not None:
            answer = _ask_server(
                server, token_file, upload, slide, question, reg, explicit(ctx, "model", model), as_json,
                evidence_png, **kw,
            )  # fmt: skip
        else:
            answer = _ask_slide(
                Path(slide), question, reg, model, model_base, device, dtype, as_json, cache, mpp,
                evidence_png=evidence_png, **kw,
            )  # fmt: skip
    if as_json:
        click.echo(answer.model_dump_json(indent=2))
    else:
        click.echo("")
        for note in ([answer.notice] if answer.notice else []) + [f"warning: {w}" for w in answer.warnings]:
            click.echo(f"[{note}]", err=True)
    if evidence_png is not None:
        click.echo(f"[evidence map written to {evidence_png}]", err=True)
    _emit_to_sinks(answer)


def _ask_slide(
    slide, question, reg, model, model_base, device, dtype, as_json, cache, mpp, evidence_png=None, **kw
):
    from wsi_llava.session import SlideSession

    with SlideSession(
        slide, model, mpp=mpp, cache_dir=cache, device=device, dtype=dtype, model_base=model_base
    ) as session:
        # a bad question fails here, before any featurization
        session.check_question(question, region=reg is not None, **kw)
        session.extract(progress=TerminalProgress())
        if as_json:
            answer = session.ask(question, reg, **kw)
        else:
            for chunk in session.ask_stream(question, reg, **kw):
                click.echo(chunk, nl=False)
            assert session.last_answer is not None
            answer = session.last_answer
        if evidence_png is not None:
            from wsi_llava.evidence_image import write_png

            write_png(evidence_png, session.reader, answer)
        return answer


#: options of `ask` that only matter where the model runs (a server brings its own)
SERVER_IGNORES = ("model_base", "device", "dtype", "cache", "mpp")


def _ask_server(server, token_file, upload, slide, question, reg, model, as_json, evidence_png, **kw):
    """Answer on a server: the answer streams as a local one does; --evidence-png reads the local slide."""
    from wsi_llava.serve.options import open_client, server_slide
    from wsi_llava.serve.schemas import AskRequest

    reader = None
    if evidence_png is not None:
        from wsi_llava.slide import open_slide

        if not Path(slide).is_file():
            raise WsiLlavaError(
                f"--evidence-png draws over the slide's thumbnail: {slide} must also be a file on this "
                "computer (give its local path with --upload, or leave --evidence-png out)"
            )
        reader = open_slide(Path(slide))
    request = dict(question=question, model=model, region=reg, **kw)
    with open_client(server, token_file) as client:
        name = server_slide(client, slide, upload)
        show = None if as_json else (lambda chunk: click.echo(chunk, nl=False))
        answer = client.ask(AskRequest(slide=name, **request), on_token=show, on_progress=TerminalProgress())
    if reader is not None:
        from wsi_llava.evidence_image import write_png

        try:
            write_png(evidence_png, reader, answer)
        finally:
            reader.close()
    return answer


def _ask_features(features, question, model, model_base, device, dtype, as_json, cache, **kw):
    from wsi_llava.model import load_model
    from wsi_llava.model.tokens_file import load_visual_tokens
    from wsi_llava.session import ask_tokens
    from wsi_llava.settings import resolve_device, using_cache_dir

    with using_cache_dir(cache):
        m = load_model(model, device=resolve_device(device), dtype=dtype, model_base=model_base)
    visual = load_visual_tokens(features, m.spec.projector.in_dim)
    show = None if as_json else (lambda chunk: click.echo(chunk, nl=False))
    return ask_tokens(m, visual, question, source=str(features), on_chunk=show, **kw)


def _region_from_options(
    region: str | None, geojson: Path | None, annotation_id: str | None, annotation_index: int | None
):
    from wsi_llava.slide.region import Region

    if region and geojson:
        raise WsiLlavaError("use either --region or --geojson/--id, not both")
    if region:
        return Region.parse_rect(region)
    if geojson:
        from wsi_llava.slide.geojson import select_region

        return select_region(geojson, annotation_id, annotation_index)
    if annotation_id or annotation_index is not None:
        raise WsiLlavaError("--id and --index need --geojson")
    return None


def _emit_to_sinks(answer, context: dict | None = None) -> None:
    from wsi_llava.plugins import sinks

    for entry in sinks().values():
        entry.fn(answer, context or {})


@cli.group(cls=UserErrorGroup, invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def models(ctx: click.Context, as_json: bool) -> None:
    """List models (built-in and registered: sources, and whether they resolve here), tile encoders,
    slide readers, judges and sinks; `models add | check | remove` manage registered models."""
    if ctx.invoked_subcommand is not None:
        return
    from wsi_llava import plugins
    from wsi_llava.registry import list_models, models_dir

    entries = list_models()
    others = {
        "tile encoders": plugins.tile_encoders(),
        "slide readers": plugins.slide_readers(),
        "judges": plugins.judges(),
        "sinks": plugins.sinks(),
    }
    if as_json:
        out: dict = {"models": [e.model_dump() for e in entries], "models_dir": str(models_dir())}
        for k, v in others.items():
            out[k] = [{"name": e.name, "plugin": e.plugin, "description": e.description} for e in v.values()]
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(f"models (registered ones under {models_dir()}):")
    for m in entries:
        state = "" if m.resolves else "  [DOES NOT RESOLVE]"
        click.echo(f"  {m.name:<24} {m.kind:<9} {m.description}{state}")
        for part, src in m.sources.items():
            click.echo(f"  {'':<24} {part}: {src}")
        if m.problem:
            click.echo(f"  {'':<24} problem: {m.problem}")
    for title, items in others.items():
        click.echo(f"{title}:")
        if not items:
            click.echo("  (none)")
        for e in items.values():
            extra = "  [" + " ".join(e.meta["suffixes"]) + "]" if "suffixes" in e.meta else ""
            click.echo(f"  {e.name:<24} {e.description}{extra}  ({e.plugin})")


def _print_report(report) -> None:
    for part in report.parts:
        click.echo(f"  {part.part}: {part.source}")
        if part.path != part.source:
            click.echo(f"      at {part.path}")
        click.echo(f"      {part.summary}")
    for line in report.widths:
        click.echo(f"  ok: {line}")


def _parse_kv(items: tuple[str, ...]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE", param_hint="--tile-encoder-arg")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


@models.command("add")
@click.argument("name")
@click.option(
    "--llava",
    required=True,
    help="LLaVA-format checkpoint (merged, LoRA, mm_projector.bin) or ours: "
    "a folder, or a Hugging Face repo id in the local cache.",
)
@click.option("--llava-base", help="Base LLM for a LoRA or projector-only --llava (e.g. llava-v1.5-7b).")
@click.option(
    "--tile-encoder",
    required=True,
    help="timm hub folder or repo id (config.json + weights), e.g. prov-gigapath/prov-gigapath.",
)
@click.option(
    "--slide-encoder", help="Prov-GigaPath slide_encoder.pth (default: beside the tile encoder's files)."
)
@click.option(
    "--tile-encoder-arg",
    "tile_args",
    multiple=True,
    metavar="KEY=VALUE",
    help="Extra timm.create_model argument a model card asks for (repeatable), e.g. "
    "mlp_layer=timm.layers.SwiGLUPacked.",
)
@click.option(
    "--template",
    type=click.Choice(["vicuna_v1", "llava_v1", "chat"]),
    help="Prompt template (default: llava_v1 for LLaVA checkpoints, else the checkpoint's own).",
)
@click.option("--overwrite", is_flag=True, help="Replace a model registered under NAME.")
def models_add(name: str, tile_args: tuple[str, ...], overwrite: bool, **parts: str | None) -> None:
    """Register the model NAME from its parts (nothing is copied); every part is checked first."""
    from wsi_llava.registry import add_model

    # the part options (--llava, --llava-base, --tile-encoder, --slide-encoder, --template) are
    # add_model's PartSources by name
    report = add_model(name, overwrite=overwrite, tile_encoder_args=_parse_kv(tile_args), **parts)
    click.echo(f"registered {name} in {report.folder}")
    _print_report(report)


@models.command("check")
@click.argument("name")
def models_check(name: str) -> None:
    """Check every part of a registered model (files, shapes, widths) without loading its weights."""
    from wsi_llava.model.parts import check_spec
    from wsi_llava.model.spec import ModelSpec
    from wsi_llava.registry import registered_model

    folder = registered_model(name, "check")
    try:
        report = check_spec(ModelSpec.load(folder))
    except WsiLlavaError as e:
        raise WsiLlavaError(f"model {name!r} ({folder}): {e}") from None
    click.echo(f"{name}: every part is in place and fits")
    _print_report(report)


@models.command("remove")
@click.argument("name")
def models_remove(name: str) -> None:
    """Forget a registered model (the weights it names are left where they are)."""
    from wsi_llava.registry import remove_model

    folder = remove_model(name)
    click.echo(f"removed {name} ({folder})")


@cli.command()
@click.option("--out", type=click.Path(path_type=Path), help="Where the demo slide lives (default: cache).")
@click.option("--device", default="auto", show_default=True)
@click.option("--max-new-tokens", default=64, show_default=True, callback=generation_setting)
def demo(out: Path | None, device: str, max_new_tokens: int) -> None:
    """Generate (or reuse) a synthetic slide and ask it a whole-slide and a region question."""
    from wsi_llava.demo import run_demo

    def show(title: str, chunks) -> None:
        click.echo(f"\n== {title}")
        for chunk in chunks:
            click.echo(chunk, nl=False)
        click.echo("")

    result = run_demo(
        out=out, device=device, max_new_tokens=max_new_tokens, on_answer=show, progress=TerminalProgress()
    )
    click.echo(f"\n[{result.notice}]")
    click.echo(f"slide: {result.slide}  annotations: {result.annotations}")


def _attach_builtin_commands() -> None:
    from wsi_llava.describe import describe_command
    from wsi_llava.eval.command import eval_command
    from wsi_llava.serve.command import serve_command
    from wsi_llava.train.command import train_command

    cli.add_command(describe_command)
    cli.add_command(eval_command)
    cli.add_command(serve_command)
    cli.add_command(train_command)


_attach_builtin_commands()


def _load_plugin_commands() -> None:
    from wsi_llava.plugins import get_plugin_manager

    get_plugin_manager().hook.register_commands(cli=cli)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``wsi-llava`` script."""
    own = OwnProcess(set(cli.commands) | {"qupath"})  # before other plugins add theirs
    try:
        _load_plugin_commands()
    except WsiLlavaError as e:  # pragma: no cover - a broken plugin must not hide built-in commands
        logger.warning("plugin commands not loaded: %s", e)
    cli.main(args=argv, prog_name="wsi-llava", obj=own)


if __name__ == "__main__":  # pragma: no cover
    main()
