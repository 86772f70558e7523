"""``wsi-llava train``: ``prepare-tiles`` + ``tiles`` (demo tile encoder), ``prepare``, ``stage1``-``stage3``,
``feature-stats`` (the training tile-feature statistics behind the out-of-distribution warning).

Under ``torchrun --nproc-per-node N -m wsi_llava.train stage3 --config ...`` (or ``accelerate launch``)
every process runs the same command; rank 0 writes logs and checkpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from wsi_llava.clickutil import cache_option
from wsi_llava.errors import WsiLlavaError
from wsi_llava.features.feature_stats import DEFAULT_QUANTILE, DEFAULT_SLIDE_FRACTION

logger = logging.getLogger(__name__)


def _out_for(config: Path, out: Path | None) -> Path:
    return out if out is not None else Path("runs") / config.stem


def _run(
    stage: str, config: Path, out: Path | None, resume: bool, stop_after: int | None, device: str
) -> None:
    from wsi_llava.train.config import load_config

    cfg = load_config(config, stage)  # type: ignore[arg-type]
    out_dir = _out_for(config, out)
    from wsi_llava.train.loop import close_dist, init_dist

    d = init_dist(device)
    try:
        final = _run_stage(stage, cfg, out_dir, d, resume, stop_after, config)
    except BaseException:
        close_dist(d, wait=False)  # the other ranks may be inside another collective
        raise
    close_dist(d)
    if d.main:
        click.echo(
            f"{stage}: done; checkpoint {final}"
            if final.exists()
            else f"{stage}: stopped; resume with --resume"
        )


def _run_stage(
    stage: str, cfg: Any, out_dir: Path, d: Any, resume: bool, stop_after: int | None, config: Path
) -> Path:
    runner: Callable[..., Path]
    if stage == "tiles":
        from wsi_llava.train.tiles import run_tile_stage as runner
    elif stage == "stage1":
        from wsi_llava.train.stage1 import run_stage1 as runner
    else:
        from wsi_llava.train.lm import run_lm_stage as runner
    return runner(cfg, out_dir, d, resume=resume, stop_after=stop_after, config_path=str(config))


def _stage_command(stage: str, help_text: str) -> click.Command:
    @click.command(stage, help=help_text)
    @click.option("--config", "config", required=True, type=click.Path(path_type=Path), help="YAML config.")
    @click.option("--out", type=click.Path(path_type=Path), help="Run folder (default runs/<config name>).")
    @click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in the run folder.")
    @click.option("--stop-after", type=int, help="Stop after this many steps (as if killed; resume later).")
    @click.option("--device", default="auto", show_default=True, help="cuda, cpu or auto.")
    def cmd(config: Path, out: Path | None, resume: bool, stop_after: int | None, device: str) -> None:
        try:
            _run(stage, config, out, resume, stop_after, device)
        except WsiLlavaError as e:
            raise click.ClickException(str(e)) from None

    return cmd


_bench_option = click.option(
    "--bench",
    "benches",
    multiple=True,
    required=True,
    type=click.Path(path_type=Path),
    help="Synthetic world folder, or bench folder/file whose slides are reachable (repeatable).",
)


@click.group("train")
def train_command() -> None:
    """Train WSI-LLaVA in three stages (configs/demo, configs/paper)."""


@train_command.command("prepare")
@_bench_option
@click.option(
    "--out", required=True, type=click.Path(path_type=Path), help="Feature pack file to write (.pt)."
)
@click.option("--tile-encoder", default="demo-vit", show_default=True, help="Registered tile encoder.")
@click.option("--weights", type=click.Path(path_type=Path), help="Tile encoder weights (default: built-in).")
@click.option("--tile-size", default=256, show_default=True)
@click.option("--mpp", "target_mpp", default=0.5, show_default=True, help="Target resolution of the tiles.")
@cache_option("Cache folder of the tile features (default ~/.cache/wsi-llava), as on ask.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--batch-size", default=64, show_default=True)
def prepare_command(
    benches: tuple[Path, ...],
    out: Path,
    tile_encoder: str,
    weights: Path | None,
    tile_size: int,
    target_mpp: float,
    cache: Path | None,
    device: str,
    batch_size: int,
) -> None:
    """Extract tile features of every slide the benches ask about and write one feature pack."""
    from wsi_llava.train.data import prepare_pack

    _write_with_progress(
        prepare_pack,
        benches,
        out,
        tile_encoder=tile_encoder,
        weights=weights,
        target_mpp=target_mpp,
        tile_size=tile_size,
        cache_dir=cache,
        device=device,
        batch_size=batch_size,
    )


def _write_with_progress(fn: Callable[..., Path], *args: Any, **kwargs: Any) -> None:
    """Run a pack writer with a terminal progress bar; user errors become one CLI error line."""
    from wsi_llava.progress import TerminalProgress

    bar = TerminalProgress()
    try:
        path = fn(*args, progress=bar, **kwargs)
    except WsiLlavaError as e:
        raise click.ClickException(str(e)) from None
    finally:
        bar.close()
    click.echo(f"wrote {path}")


@train_command.command("prepare-tiles")
@_bench_option
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Tile pack file to write (.pt).")
@click.option(
    "--tile-encoder", default="demo-vit", show_default=True, help="Encoder whose input size to use."
)
@click.option("--tile-size", default=256, show_default=True)
@click.option("--mpp", "target_mpp", default=0.5, show_default=True, help="Target resolution of the tiles.")
@click.option("--max-tiles-per-region", default=48, show_default=True)
@click.option(
    "--no-annotations",
    is_flag=True,
    help="Use each question's region box even where annotations/<slide>.geojson has the annotated polygon.",
)
def prepare_tiles_command(
    benches: tuple[Path, ...],
    out: Path,
    tile_encoder: str,
    tile_size: int,
    target_mpp: float,
    max_tiles_per_region: int,
    no_annotations: bool,
) -> None:
    """Pair the tiles of every annotated region with its description; write one tile pack."""
    from wsi_llava.train.tile_pack import prepare_tile_pack

    _write_with_progress(
        prepare_tile_pack,
        benches,
        out,
        tile_encoder=tile_encoder,
        target_mpp=target_mpp,
        tile_size=tile_size,
        use_annotations=not no_annotations,
        max_tiles_per_region=max_tiles_per_region,
    )


@train_command.command("feature-stats")
@click.option(
    "--pack",
    "packs",
    multiple=True,
    required=True,
    type=click.Path(path_type=Path),
    help="Feature pack of the training slides (`train prepare`, repeatable).",
)
@click.option(
    "--checkpoint",
    required=True,
    type=click.Path(path_type=Path),
    help="Checkpoint folder: the statistics are written into it and named in its wsi_llava.json.",
)
@click.option(
    "--quantile",
    default=DEFAULT_QUANTILE,
    show_default=True,
    help="Quantile of the training tiles' (cross-fitted) distances a tile must pass to count as far.",
)
@click.option(
    "--slide-fraction",
    default=DEFAULT_SLIDE_FRACTION,
    show_default=True,
    help="Fraction of a slide's (or region's) tiles beyond it that makes the answer carry a warning.",
)
def feature_stats_command(
    packs: tuple[Path, ...], checkpoint: Path, quantile: float, slide_fraction: float
) -> None:
    """Fit the training tile-feature statistics a checkpoint's out-of-distribution warning uses."""
    from wsi_llava.train.feature_stats import write_feature_stats

    try:
        stats = write_feature_stats(packs, checkpoint, quantile=quantile, slide_fraction=slide_fraction)
    except WsiLlavaError as e:
        raise click.ClickException(str(e)) from None
    info = stats.info
    click.echo(
        f"feature statistics of {info['n_tiles']} tiles ({info['n_slides']} slides): tile threshold "
        f"{stats.tile_threshold:.3f} at q={stats.quantile}; largest cross-fitted slide fraction beyond it "
        f"{info['cross_fit_slide_fraction_max']:.3f} (warning at {stats.slide_fraction}); wrote into {checkpoint}"
    )


train_command.add_command(
    _stage_command(
        "tiles", "Tile-text alignment (demo recipe, before stage 1): the tile encoder vs region descriptions."
    )
)
train_command.add_command(
    _stage_command("stage1", "Stage 1: WSI-text contrastive alignment (slide encoder vs text encoder).")
)
train_command.add_command(_stage_command("stage2", "Stage 2: projector only, LLM and encoders frozen."))
train_command.add_command(_stage_command("stage3", "Stage 3: instruction tuning, projector + LoRA."))
