"""The widget's "Run on: server" mode: test a ``wsi-llava serve`` server, and ask it as the local worker does.

Thin by design: every request goes through the core's :class:`~wsi_llava.serve.client.ServerClient`, whose
errors already name the failure (name not resolved, refused, timeout, TLS, 401, 403, API version). The
questions' events are those of :func:`napari_wsi_llava._jobs.ask_events`, so the widget streams, cancels
and shows evidence the same way whichever computer answers.

Slides: the layer's source path is sent as is (a server that sees the same files, e.g. on this computer or
a shared mount inside its ``--slides-root``). When the server answers 403 (outside its root) or 404 (not
there) for that path, and the token is good, the file is uploaded once and asked about by its upload name;
the upload is remembered for the widget's life (the server stores each content once).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from napari_wsi_llava._jobs import Job, pump_events
from wsi_llava.errors import Cancelled
from wsi_llava.progress import CancelToken

logger = logging.getLogger(__name__)

#: the choices of the widget's "run on" box
LOCAL, SERVER = "this computer", "server"
#: seconds Test connection waits for each reply
CHECK_TIMEOUT = 10.0


@dataclass(frozen=True)
class ServerSettings:
    """The server the widget asks: its URL and the file holding its token (empty: ``$WSI_LLAVA_TOKEN``)."""

    url: str
    token_file: str = ""

    def client(self, timeout: float | None = None) -> Any:
        """A :class:`ServerClient` for these settings (raises a named error for a bad URL or token file)."""
        from wsi_llava.serve.client import DEFAULT_TIMEOUT, ServerClient, read_token

        if not self.url.strip():
            from wsi_llava.serve.client import ServerError

            raise ServerError("no server address: type the server's URL (http://HOST:PORT) in the widget")
        token = read_token(self.token_file.strip() or None)
        return ServerClient(self.url, token, timeout=timeout or DEFAULT_TIMEOUT)


def check_connection(settings: ServerSettings) -> tuple[str, Any]:
    """Health (API version checked) and the model list, which needs the token: ``("ok", (health, models))``
    or ``("error", the named user error)``. Runs in a thread worker."""
    from wsi_llava.errors import WsiLlavaError

    try:
        with settings.client(timeout=CHECK_TIMEOUT) as client:
            health = client.health()
            models = client.models()
    except WsiLlavaError as e:
        return "error", e
    return "ok", (health, models)


def connected_message(settings: ServerSettings, health: Any, models: Any) -> str:
    names = ", ".join(m.name for m in models.models) or "none"
    auth = "token accepted" if health.auth else "no token needed"
    return (
        f"WSI-LLaVA: connected to {settings.url} (wsi-llava {health.version}, API {health.api}, {auth}); "
        f"models: {names}"
    )


class UploadMemo:
    """The upload names of local slides already sent to a server, by (server URL, resolved path)."""

    def __init__(self) -> None:
        self._names: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def get(self, url: str, path: str) -> str | None:
        with self._lock:
            return self._names.get((url, str(Path(path).resolve())))

    def put(self, url: str, path: str, name: str) -> None:
        with self._lock:
            self._names[(url, str(Path(path).resolve()))] = name


def server_ask_events(
    settings: ServerSettings,
    uploads: UploadMemo,
    slide: str,
    dimensions: tuple[int, int],
    model: str | None,
    jobs: list[Job],
    cancel: CancelToken,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    evidence: bool = True,
) -> Iterator[tuple]:
    """The events of :func:`~napari_wsi_llava._jobs.ask_events` for ``jobs`` about the local ``slide``,
    answered by the server; each answer names the local slide (as the widget's history expects)."""
    state: dict[str, Any] = {}

    def answer_all(emit: Callable[[tuple], None]) -> None:
        from wsi_llava.serve.client import Forbidden, NotFound
        from wsi_llava.serve.schemas import AskRequest

        emit(("status", f"connecting to {settings.url}…"))
        with settings.client() as client:
            state["client"] = client
            client.ensure_compatible()
            name = uploads.get(client.url, slide) or slide
            for i, job in enumerate(jobs):
                cancel.raise_if_cancelled()
                emit(("start", i, job))
                request = dict(
                    question=job.question,
                    region=job.region,
                    model=model,
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    evidence=evidence,
                )
                try:
                    answer = _ask(client, AskRequest(slide=name, **request), i, emit, cancel)
                except (Forbidden, NotFound) as e:
                    if name != slide:
                        raise
                    client.models()  # a wrong token raises here: no upload for that
                    logger.info("the server cannot read %s (%s): uploading it", slide, e)
                    emit(
                        ("status", f"the server cannot read this slide there: uploading {Path(slide).name}…")
                    )
                    ref = client.upload(slide, on_progress=lambda d, t: emit(("progress", d, t, "uploading")))
                    uploads.put(client.url, slide, ref.slide)
                    name = ref.slide
                    emit(("uploaded", ref))
                    answer = _ask(client, AskRequest(slide=name, **request), i, emit, cancel)
                emit(("answer", i, answer.model_copy(update={"slide": slide}), dimensions))

    def close_connection() -> None:
        client = state.get("client")
        if client is not None:
            client.close()  # a blocked read ends; the server sees the client go and stops the answer

    yield from pump_events(answer_all, cancel, on_cancel=close_connection)


def _ask(client: Any, request: Any, i: int, emit: Callable[[tuple], None], cancel: CancelToken) -> Any:
    """One streamed answer of question ``i``: its progress and tokens emitted, the Answer returned."""
    from wsi_llava.answer import Answer
    from wsi_llava.serve.schemas import Progress, TokenEvent

    answer = None
    for event in client.ask_events(request):
        if cancel.cancelled:
            raise Cancelled("answer cancelled by the user")
        if isinstance(event, Answer):
            answer = event
        elif isinstance(event, TokenEvent):
            emit(("token", i, event.text))
        elif isinstance(event, Progress):
            emit(("progress", event.done, event.total, event.message or "on the server"))
    cancel.raise_if_cancelled()  # keep no answer that arrived after a cancel
    return answer
