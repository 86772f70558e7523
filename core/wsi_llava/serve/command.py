"""``wsi-llava serve``: run the ``/v1`` server (uvicorn) for one GPU box; SIGTERM drains, then exits 0."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import click
from pydantic import ValidationError

from wsi_llava.errors import WsiLlavaError

logger = logging.getLogger(__name__)

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def quiet_progress_bars() -> None:
    """Turn off the model libraries' progress bars (model loading, GGUF conversion) in this process and the
    model workers it starts: a server's stderr is a log. Logging, the libraries' and wsi_llava's, stays."""
    os.environ["TQDM_DISABLE"] = "1"  # read when tqdm is imported, here or in a spawned worker
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (``port`` 0: a free one), bound before the models load."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise WsiLlavaError(f"--host {host!r}: cannot resolve it ({e})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise WsiLlavaError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _draining_server(engine: Any, grace: float, config: Any) -> Any:
    """A uvicorn server whose first SIGTERM/SIGINT drains the engine before it stops (and exits 0)."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def __init__(self) -> None:
            super().__init__(config)
            self._drain_started = False

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if self._drain_started:
                if sig == signal.SIGINT:  # a second Ctrl-C: stop now
                    self.force_exit = True
                    self.should_exit = True
                return
            self._drain_started = True
            logger.warning("signal %d: draining (up to %g s), then stopping", sig, grace)
            threading.Thread(target=self._drain, name="drain", daemon=True).start()

        def _drain(self) -> None:
            cancelled = engine.drain(grace)
            if cancelled:
                logger.warning("%d request(s) cancelled at the end of the drain", cancelled)
            time.sleep(0.2)  # the last events leave before the sockets close
            self.should_exit = True

    return DrainingServer()


@click.command("serve")
@click.option(
    "--model", "models", multiple=True, help="Model to serve (repeatable; the first is the default)."
)
@click.option(
    "--slides-root",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Only slides under this folder may be opened by path.",
)
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Bind address (non-loopback needs --token-file)."
)
@click.option("--port", default=8765, show_default=True, type=int, help="TCP port (0: any free one).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option(
    "--devices", help="One model worker process per device, comma-separated (cuda:0,cuda:1); slides routed."
)
@click.option(
    "--workers", type=int, help="N model worker processes: cuda:0..N-1 on CUDA, N processes on the CPU."
)
@click.option("--cache", type=click.Path(path_type=Path), help="Cache folder (default ~/.cache/wsi-llava).")
@click.option(
    "--token-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="File holding the bearer token clients must send (needed off loopback).",
)
@click.option("--max-batch", default=16, show_default=True, type=int, help="Answers decoded together.")
@click.option(
    "--queue", "queue", default=64, show_default=True, type=int, help="Requests waiting before 429."
)
@click.option(
    "--timeout", default=600.0, show_default=True, type=float, help="Seconds per request before 504."
)
@click.option("--max-upload-mb", default=4096.0, show_default=True, type=float, help="Largest slide upload.")
@click.option("--max-body-mb", default=32.0, show_default=True, type=float, help="Largest JSON request body.")
@click.option(
    "--cors-origin",
    "cors_origins",
    multiple=True,
    help="Allowed browser origin (repeatable; CORS off otherwise).",
)
@click.option(
    "--uploads",
    type=click.Path(path_type=Path, file_okay=False),
    help="Upload folder (default: under the cache).",
)
@click.option(
    "--drain-seconds",
    default=30.0,
    show_default=True,
    type=float,
    help="Grace for running answers on SIGTERM.",
)
@click.option(
    "--max-sessions",
    default=8,
    show_default=True,
    type=int,
    help="Open slides kept per server (or model worker); the least recently used is closed first "
    "(its features stay in the cache).",
)
@click.option(
    "--log-level", default="warning", show_default=True, type=click.Choice(LOG_LEVELS, case_sensitive=False)
)
def serve_command(
    models: tuple[str, ...],
    slides_root: Path,
    host: str,
    port: int,
    device: str,
    devices: str | None,
    workers: int | None,
    cache: Path | None,
    token_file: Path | None,
    max_batch: int,
    queue: int,
    timeout: float,
    max_upload_mb: float,
    max_body_mb: float,
    cors_origins: tuple[str, ...],
    uploads: Path | None,
    drain_seconds: float,
    max_sessions: int,
    log_level: str,
) -> None:
    """Serve models over HTTP (/v1, OpenAPI at /docs) to napari, QuPath and CLI users."""
    quiet_progress_bars()
    import uvicorn

    from wsi_llava.serve.app import create_app
    from wsi_llava.serve.config import ServeConfig
    from wsi_llava.serve.workers import make_engine, parse_devices

    if not slides_root.is_dir():
        raise click.BadParameter(f"{slides_root}: no such folder", param_hint="--slides-root")
    try:
        config = ServeConfig(
            models=list(models) or ["demo"],
            slides_root=slides_root.resolve(),
            host=host,
            port=port,
            device=device,
            cache=cache,
            token_file=token_file,
            max_batch=max_batch,
            queue=queue,
            timeout=timeout,
            max_upload_mb=max_upload_mb,
            max_body_mb=max_body_mb,
            cors_origins=list(cors_origins),
            uploads=uploads,
            drain_seconds=drain_seconds,
            max_sessions=max_sessions,
            log_level=log_level.lower(),
        )
    except ValidationError as e:
        err = e.errors()[0]
        field = "--" + "-".join(str(p) for p in err["loc"]).replace("_", "-")
        raise click.BadParameter(err["msg"], param_hint=field) from None
    if not config.loopback and config.token_file is None:
        raise click.UsageError(
            f"--host {host} is reachable from other machines: give --token-file FILE (a long random token "
            "that clients send as 'Authorization: Bearer ...'), or bind to 127.0.0.1"
        )
    level = getattr(logging, config.log_level.upper())
    logging.getLogger("wsi_llava").setLevel(level)
    engine = make_engine(config, parse_devices(devices, workers, config.device))
    app = create_app(config, engine)  # a bad token file fails here, before the models load
    sock = bind_socket(host, port)
    try:
        engine.load()
        bound = sock.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        click.echo(
            f"wsi-llava serve: http://{shown}:{bound} (models: {', '.join(config.models)}, "
            f"slides root: {config.slides_root})"
        )
        uv = uvicorn.Config(
            app,
            log_level=config.log_level,
            access_log=level <= logging.INFO,
            lifespan="off",
            timeout_graceful_shutdown=5,
            server_header=False,
        )
        server = _draining_server(engine, config.drain_seconds, uv)
        server.run(sockets=[sock])
    finally:
        engine.close()
        sock.close()
