"""The ``wsi-llava`` command: synth, extract, ask, models, demo (+ commands from plugins)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from wsi_llava.clickutil import UserErrorGroup
from wsi_llava.errors import WsiLlavaError
from wsi_llava.progress import TerminalProgress

logger = logging.getLogger("wsi_llava")


@click.group(cls=UserErrorGroup)
@click.version_option(package_name="wsi-llava")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """WSI-LLaVA: ask questions about whole slide images and regions of them."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@cli.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--n-slides", default=4, show_default=True, help="Number of slides to generate.")
@click.option("--seed", default=0, show_default=True, help="Random seed (same seed, same world).")
@click.option("--size", default=4096, show_default=True, help="Level-0 width and height in pixels.")
@click.option("--mpp", default=0.5, show_default=True, help="Microns per level-0 pixel.")
@click.option("--split", default="test", show_default=True, help="Name of the bench split (file suffix).")
@click.option("--overwrite", is_flag=True, help="Replace an existing world in OUT.")
def synth(out: Path, n_slides: int, seed: int, size: int, mpp: float, split: str, overwrite: bool) -> None:
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
@click.option("--encoder", default="demo-vit", show_default=True, help="Registered tile encoder.")
@click.option("--weights", type=click.Path(path_type=Path), help="Local weights file for the encoder.")
@click.option(
    "--cache", "cache", type=click.Path(path_type=Path), help="Cache folder (default ~/.cache/wsi-llava)."
)
@click.option("--target-mpp", default=0.5, show_default=True, help="Tile resolution in µm/px.")
@click.option("--tile-size", default=256, show_default=True, help="Tile edge in pixels at --target-mpp.")
@click.option("--mpp", type=float, help="µm/px of level 0 for files that record none.")
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
    encoder: str,
    weights: Path | None,
    cache: Path | None,
    target_mpp: float,
    tile_size: int,
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
    from wsi_llava.encoders.cache import FeatureCache
    from wsi_llava.encoders.cohort import DistEnv, extract_cohort, list_slides
    from wsi_llava.encoders.tile import build_tile_encoder
    from wsi_llava.settings import cache_dir

    if not slides and list_file is None:
        raise click.UsageError("give slide files, folders of slides, or --list FILE")
    env = DistEnv.from_env()
    paths = list_slides(slides, list_file)
    enc = build_tile_encoder(encoder, weights=weights).eval()
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


@cli.command()
@click.argument("slide", type=click.Path(path_type=Path))
@click.argument("question")
@click.option("--region", help="Level-0 rectangle x,y,w,h.")
@click.option("--geojson", type=click.Path(path_type=Path), help="QuPath GeoJSON with annotations.")
@click.option("--id", "annotation_id", help="Annotation id or name in --geojson.")
@click.option(
    "--model", default="demo", show_default=True, help="Registered model name or checkpoint folder."
)
@click.option(
    "--model-base",
    type=click.Path(path_type=Path),
    help="Base llava-v1.5-7b folder for a LoRA LLaVA checkpoint.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
@click.option("--cache", type=click.Path(path_type=Path), help="Cache folder (default ~/.cache/wsi-llava).")
@click.option("--mpp", type=float, help="µm/px of level 0 for files that record none.")
@click.option("--max-new-tokens", type=int, help="Longest answer in tokens.")
@click.option("--temperature", type=float, help="0 = greedy (default), >0 samples.")
@click.option("--device", default="auto", show_default=True)
def ask(
    slide: Path,
    question: str,
    region: str | None,
    geojson: Path | None,
    annotation_id: str | None,
    model: str,
    model_base: Path | None,
    as_json: bool,
    cache: Path | None,
    mpp: float | None,
    max_new_tokens: int | None,
    temperature: float | None,
    device: str,
) -> None:
    """Ask a question about a whole slide, a rectangle (--region) or an annotation (--geojson/--id)."""
    from wsi_llava.session import SlideSession

    reg = _region_from_options(region, geojson, annotation_id)
    if not question.strip():
        raise WsiLlavaError("question is empty: type a question about the slide or region")
    with SlideSession(
        slide, model, mpp=mpp, cache_dir=cache, device=device, model_base=model_base
    ) as session:
        session.extract(progress=TerminalProgress())
        kw = {"max_new_tokens": max_new_tokens, "temperature": temperature}
        if as_json:
            answer = session.ask(question, reg, **kw)
            click.echo(answer.model_dump_json(indent=2))
        else:
            for chunk in session.ask_stream(question, reg, **kw):
                click.echo(chunk, nl=False)
            click.echo("")
            answer = session.last_answer
            if answer is not None and answer.notice:
                click.echo(f"[{answer.notice}]", err=True)
        _emit_to_sinks(answer)


def _region_from_options(region: str | None, geojson: Path | None, annotation_id: str | None):
    from wsi_llava.slide.region import Region

    if region and geojson:
        raise WsiLlavaError("use either --region or --geojson/--id, not both")
    if region:
        return Region.parse_rect(region)
    if geojson:
        from wsi_llava.slide.geojson import find_region, read_geojson

        regions = read_geojson(geojson)
        if annotation_id is None:
            if len(regions) == 1:
                return regions[0]
            raise WsiLlavaError(f"{geojson}: holds {len(regions)} annotations; choose one with --id")
        return find_region(regions, annotation_id, source=str(geojson))
    if annotation_id:
        raise WsiLlavaError("--id needs --geojson")
    return None


def _emit_to_sinks(answer, context: dict | None = None) -> None:
    from wsi_llava.plugins import sinks

    for entry in sinks().values():
        entry.fn(answer, context or {})


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def models(as_json: bool) -> None:
    """List registered models, tile encoders, slide readers, judges and sinks."""
    from wsi_llava import plugins

    groups = {
        "models": plugins.models(),
        "tile encoders": plugins.tile_encoders(),
        "slide readers": plugins.slide_readers(),
        "judges": plugins.judges(),
        "sinks": plugins.sinks(),
    }
    if as_json:
        out = {
            k: [{"name": e.name, "plugin": e.plugin, "description": e.description} for e in v.values()]
            for k, v in groups.items()
        }
        click.echo(json.dumps(out, indent=2))
        return
    for title, entries in groups.items():
        click.echo(f"{title}:")
        if not entries:
            click.echo("  (none)")
        for e in entries.values():
            extra = ""
            if "suffixes" in e.meta:
                extra = "  [" + " ".join(e.meta["suffixes"]) + "]"
            click.echo(f"  {e.name:<24} {e.description}{extra}  ({e.plugin})")


@cli.command()
@click.option("--out", type=click.Path(path_type=Path), help="Where the demo slide lives (default: cache).")
@click.option("--device", default="auto", show_default=True)
@click.option("--max-new-tokens", default=64, show_default=True)
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
    from wsi_llava.train.command import train_command

    cli.add_command(describe_command)
    cli.add_command(eval_command)
    cli.add_command(train_command)


_attach_builtin_commands()


def _load_plugin_commands() -> None:
    from wsi_llava.plugins import get_plugin_manager

    get_plugin_manager().hook.register_commands(cli=cli)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``wsi-llava`` script."""
    try:
        _load_plugin_commands()
    except WsiLlavaError as e:  # pragma: no cover - a broken plugin must not hide built-in commands
        logger.warning("plugin commands not loaded: %s", e)
    cli.main(args=argv, prog_name="wsi-llava")


if __name__ == "__main__":  # pragma: no cover
    main()
