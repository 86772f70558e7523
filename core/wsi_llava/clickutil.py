"""click helpers shared by the core CLI and plugin command groups."""

from __future__ import annotations

import errno
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from wsi_llava.errors import Cancelled, WsiLlavaError
from wsi_llava.settings import DTYPES

_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class UserErrorGroup(click.Group):
    """A click group whose user errors become one ``Error: …`` line and a non-zero exit, no traceback.

    A full disk is the user's to fix too: it becomes one line naming the file being written.
    """

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except Cancelled as e:
            raise click.ClickException(f"cancelled: {e}") from None
        except WsiLlavaError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            raise click.ClickException("interrupted") from None
        except OSError as e:
            if e.errno not in _DISK_FULL:
                raise
            where = f"{e.filename}: " if e.filename else ""
            raise click.ClickException(f"{where}disk full ({e.strerror or e}); free some space") from None


def cache_option(help: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--cache DIR`` (the command gets ``cache``); ``--cache-dir``, its old spelling, still works but is
    hidden from ``--help``, and the two naming different folders is refused."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def command(*args: Any, cache_dir_alias: Path | None = None, **kw: Any) -> Any:
            if cache_dir_alias is not None:
                if kw.get("cache") is not None and Path(kw["cache"]) != Path(cache_dir_alias):
                    raise click.UsageError("give --cache only (--cache-dir is its old spelling)")
                kw["cache"] = cache_dir_alias
            return fn(*args, **kw)

        command = click.option(
            "--cache-dir",
            "cache_dir_alias",
            type=click.Path(path_type=Path),
            hidden=True,
            help="Old spelling of --cache, kept so existing scripts run.",
        )(command)
        return click.option("--cache", type=click.Path(path_type=Path), help=help)(command)

    return decorate


def generation_setting(ctx: click.Context, param: click.Parameter, value: object) -> object:
    """A click callback refusing a decoding option out of range (``--temperature inf``...) before any work,
    by the same rules as the model's ``GenerationSpec``."""
    if value is None or param.name is None:
        return value
    from wsi_llava.model.spec import GENERATION_RULES, GenerationSpec

    try:
        GenerationSpec().with_overrides(**{param.name: value})
    except WsiLlavaError:
        raise click.BadParameter(f"{GENERATION_RULES[param.name]}, got {value!r}") from None
    return value


def generation_options(fn):
    """``--max-new-tokens`` and ``--temperature``, validated when parsed."""
    fn = click.option(
        "--temperature", type=float, callback=generation_setting, help="0 = greedy (default), >0 samples."
    )(fn)
    fn = click.option(
        "--max-new-tokens", type=int, callback=generation_setting, help="Longest answer in tokens."
    )(fn)
    return fn


def model_options(default: str | None = "demo", device: str = "auto"):
    """``--model``, ``--model-base``, ``--device``, ``--dtype``: the same model options on every command."""

    def decorate(fn):
        for opt in reversed(
            [
                click.option(
                    "--model",
                    default=default,
                    show_default=default is not None,
                    help="Built-in or registered model name (see `wsi-llava models`), or a checkpoint folder.",
                ),
                click.option(
                    "--model-base",
                    type=click.Path(path_type=Path),
                    help="Base LLM folder for a LoRA checkpoint folder given to --model (e.g. llava-v1.5-7b).",
                ),
                click.option(
                    "--device",
                    default=device,
                    show_default=True,
                    help="auto (CUDA when present), cpu, cuda, cuda:N.",
                ),
                click.option(
                    "--dtype",
                    type=click.Choice(DTYPES),
                    help="Model weights' dtype (default: bfloat16 on CUDA and on CPUs with bf16 arithmetic, "
                    "else float32).",
                ),
            ]
        ):
            fn = opt(fn)
        return fn

    return decorate


def evidence_options(what: str):
    """``--evidence``, ``--evidence-tiles``, ``--evidence-mass``: write an answer's relevant tiles as QuPath
    detections (``what`` says where they go). The command receives one ``evidence`` argument: an
    ``EvidenceSelection``, or None without ``--evidence``."""
    from wsi_llava.evidence_tiles import DEFAULT_MASS, DEFAULT_MAX_TILES, EvidenceSelection

    def decorate(fn):
        @functools.wraps(fn)
        def command(*args, evidence: bool, evidence_tiles: int | None, evidence_mass: float | None, **kw):
            if not evidence:
                if evidence_tiles is not None or evidence_mass is not None:
                    raise click.UsageError("--evidence-tiles and --evidence-mass go with --evidence")
                return fn(*args, evidence=None, **kw)
            selection = EvidenceSelection(
                mass=DEFAULT_MASS if evidence_mass is None else evidence_mass,
                max_tiles=DEFAULT_MAX_TILES if evidence_tiles is None else evidence_tiles,
            )
            return fn(*args, evidence=selection, **kw)

        for opt in reversed(
            [
                click.option(
                    "--evidence",
                    is_flag=True,
                    help="Also add the answer's relevant tiles as square detections classified "
                    f"'WSI-LLaVA evidence' {what}, replacing the evidence of an earlier answer there: "
                    + EvidenceSelection().describe()
                    + ". Colour them by it with QuPath's Measure > Show measurement maps.",
                ),
                click.option(
                    "--evidence-tiles",
                    type=click.IntRange(min=1),
                    help=f"With --evidence: most tiles per answer (default {DEFAULT_MAX_TILES}).",
                ),
                click.option(
                    "--evidence-mass",
                    type=click.FloatRange(0, 1, min_open=True),
                    help="With --evidence: share of the answer's relevance the tiles hold "
                    f"(default {DEFAULT_MASS:g}).",
                ),
            ]
        ):
            command = opt(command)
        return command

    return decorate
