"""The judge interface, the on-disk cache of judge calls and the ``kind:model`` spec parser."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from wsi_llava.atomic import atomic_write_text
from wsi_llava.errors import WsiLlavaError

logger = logging.getLogger(__name__)

Messages = list[dict[str, str]]


class JudgeError(WsiLlavaError):
    """The judge cannot be reached or keeps failing (after retries); partial results are kept."""


@runtime_checkable
class Judge(Protocol):
    """A chat model that answers a list of ``{"role", "content"}`` messages with text."""

    #: ``kind:model`` as written into reports, e.g. ``openai:gpt-4o-mini``.
    name: str
    #: how many calls may run at once (the metric code uses this many worker threads).
    concurrency: int

    def complete(self, messages: Messages) -> str: ...


def parse_judge_spec(spec: str) -> tuple[str, str]:
    """``"openai:gpt-4o-mini"`` -> ``("openai", "gpt-4o-mini")``; a bare name means ``openai``."""
    kind, sep, model = spec.partition(":")
    if not sep:
        return "openai", spec
    if not kind or not model:
        raise WsiLlavaError(
            f"--judge {spec!r}: expected KIND:MODEL, e.g. openai:gpt-4o-mini or hf:/path/to/model"
        )
    return kind, model


def make_judge(spec: str, **options: Any) -> Judge:
    """Build a judge from a registered kind (plugins may add kinds through ``register_judges``)."""
    import importlib

    from wsi_llava import plugins

    builtin = "wsi_llava.eval.plugin"
    pm = plugins.get_plugin_manager()
    module = importlib.import_module(builtin)
    if pm.get_plugin(builtin) is None and not pm.is_registered(module):
        plugins.register_plugin(module, builtin)  # until it is listed in plugins.DEFAULT_PLUGINS
    kind, model = parse_judge_spec(spec)
    registered = plugins.judges()
    if kind not in registered:
        raise WsiLlavaError(
            f"--judge {spec!r}: unknown judge kind {kind!r} (known: {', '.join(sorted(registered))})"
        )
    return registered[kind].fn(model, **options)


class JudgeCache:
    """One JSON file per call, keyed by a hash of (judge name, messages): a re-run costs nothing."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()

    @staticmethod
    def key(name: str, messages: Messages) -> str:
        blob = json.dumps({"judge": name, "messages": messages}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, name: str, messages: Messages) -> str | None:
        p = self._path(self.key(name, messages))
        try:
            text = json.loads(p.read_text(encoding="utf-8"))["response"]
        except (FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            with self._lock:
                self.misses += 1
            return None
        with self._lock:
            self.hits += 1
        return str(text)

    def put(self, name: str, messages: Messages, response: str) -> None:
        p = self._path(self.key(name, messages))
        p.parent.mkdir(parents=True, exist_ok=True)
        # no fsync: an entry lost in a crash is only asked again (a damaged one reads as a miss)
        atomic_write_text(
            p,
            json.dumps({"judge": name, "messages": messages, "response": response}, ensure_ascii=False),
            fsync=False,
        )


class CachedJudge:
    """Wraps a judge so every completed call is stored in, and served from, a ``JudgeCache``."""

    def __init__(self, judge: Judge, cache: JudgeCache) -> None:
        self.judge = judge
        self.cache = cache
        self.name = judge.name
        self.concurrency = judge.concurrency
        self.calls = 0

    def complete(self, messages: Messages) -> str:
        hit = self.cache.get(self.name, messages)
        if hit is not None:
            return hit
        text = self.judge.complete(messages)
        self.calls += 1
        self.cache.put(self.name, messages, text)
        return text
