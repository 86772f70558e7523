"""``--server`` / ``--token-file`` / ``--upload``: the options that send a command's question to a server.

Shared by ``ask``, ``describe`` and ``wsi-llava qupath describe|ask``, with the one rule for slides:
the path is passed as the server sees it, unless ``--upload`` sends the local file first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:  # httpx is imported only when a command talks to a server
    from wsi_llava.serve.client import ServerClient

SLIDE_RULE = (
    "With --server the slide is named as the server sees it: a path relative to the server's --slides-root "
    "(or absolute inside it), nothing is read here; with --upload it is a file on this computer, sent to "
    "the server first (content-addressed: the same bytes are stored once, so uploading again costs "
    "nothing)."
)


def server_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--server URL``, ``--token-file FILE`` and ``--upload`` (the command gets ``server``, ``token_file``,
    ``upload``)."""
    for opt in reversed(
        [
            click.option(
                "--server",
                metavar="URL",
                envvar="WSI_LLAVA_SERVER",
                help="Answer on a `wsi-llava serve` server (http(s)://HOST:PORT, or $WSI_LLAVA_SERVER) "
                "instead of this computer. " + SLIDE_RULE,
            ),
            click.option(
                "--token-file",
                type=click.Path(path_type=Path, dir_okay=False),
                help="File holding the server's bearer token (default: $WSI_LLAVA_TOKEN); the token is never "
                "printed or logged.",
            ),
            click.option(
                "--upload",
                is_flag=True,
                help="With --server: upload the local slide file first, for a server that cannot see it.",
            ),
        ]
    ):
        fn = opt(fn)
    return fn


def check_server_use(
    ctx: click.Context, server: str | None, token_file: Path | None, upload: bool, local_only: Iterable[str]
) -> None:
    """Refuse options that do nothing where the question is answered (named, before any work)."""
    if server is None:
        if upload or token_file is not None:
            raise click.UsageError("--upload and --token-file go with --server URL")
        return
    given = [
        name
        for name in local_only
        if ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)
    ]
    if given:
        flags = ", ".join("--" + n.replace("_", "-") for n in given)
        raise click.UsageError(
            f"{flags}: set on the server, not with --server (the server's own settings apply)"
        )


def explicit(ctx: click.Context, name: str, value: Any) -> Any:
    """``value`` when the user gave option ``name``, else None (the server's default then applies)."""
    source = ctx.get_parameter_source(name)
    return value if source not in (None, click.core.ParameterSource.DEFAULT) else None


def open_client(server: str, token_file: Path | None) -> ServerClient:
    """A client of ``server`` with the token of ``token_file`` (or ``$WSI_LLAVA_TOKEN``), API checked."""
    from wsi_llava.serve.client import ServerClient, read_token

    client = ServerClient(server, read_token(token_file))
    try:
        client.ensure_compatible()
    except BaseException:
        client.close()
        raise
    return client


def server_slide(client: ServerClient, slide: str | Path, upload: bool) -> str:
    """What a request's ``slide`` is: the local file's upload name with ``upload``, else ``slide`` as given."""
    if not upload:
        return str(slide)
    from wsi_llava.progress import TerminalProgress

    progress = TerminalProgress()
    ref = client.upload(Path(slide), on_progress=lambda done, total: progress(done, total, "uploading"))
    progress.close()
    return ref.slide
