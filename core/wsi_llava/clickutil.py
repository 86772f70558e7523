"""click helpers shared by the core CLI and plugin command groups."""

from __future__ import annotations

from pathlib import Path

import click

from wsi_llava.errors import Cancelled, WsiLlavaError


class UserErrorGroup(click.Group):
    """A click group whose user errors become one ``Error: …`` line and a non-zero exit, no traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except Cancelled as e:
            raise click.ClickException(f"cancelled: {e}") from None
        except WsiLlavaError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            raise click.ClickException("interrupted") from None


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
                    type=click.Choice(["float32", "bfloat16", "float16"]),
                    help="Model weights' dtype (default: bfloat16 on CUDA, float32 on the CPU).",
                ),
            ]
        ):
            fn = opt(fn)
        return fn

    return decorate
