"""click helpers shared by the core CLI and plugin command groups."""

from __future__ import annotations

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
