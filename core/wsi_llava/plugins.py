"""The plugin manager: built-in and third-party readers, encoders, models, judges and sinks.

Registries are built lazily from the ``register_*`` hooks the first time they are asked for, so
importing ``wsi_llava`` stays cheap. ``WSI_LLAVA_LOAD_PLUGINS=0`` skips entry-point plugins.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from wsi_llava import hookspecs

logger = logging.getLogger(__name__)

DEFAULT_PLUGINS = (
    "wsi_llava.slide.plugin",
    "wsi_llava.features.plugin",
    "wsi_llava.model.plugin",
    "wsi_llava.eval.plugin",
)


@dataclass(frozen=True)
class Entry:
    """One registered thing: its name, the callable that makes or runs it, and metadata."""

    kind: str
    name: str
    fn: Callable[..., Any]
    plugin: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def description(self) -> str:
        return str(self.meta.get("description", ""))


_pm: pluggy.PluginManager | None = None
_registries: dict[str, dict[str, Entry]] = {}


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager with built-ins and entry-point plugins loaded."""
    global _pm
    if _pm is None:
        pm = pluggy.PluginManager("wsi_llava")
        pm.add_hookspecs(hookspecs)
        for module in DEFAULT_PLUGINS:
            pm.register(importlib.import_module(module), name=module)
        if os.environ.get("WSI_LLAVA_LOAD_PLUGINS", "1") != "0":
            _load_entry_points(pm)
        pm.check_pending()
        _pm = pm
    return _pm


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    """Register the ``wsi_llava`` entry-point plugins; one that fails to import is logged and skipped."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="wsi_llava"):
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as e:  # a broken third-party plugin must not take the built-ins down
            logger.warning("plugin %r (%s) failed to load and is skipped: %s", ep.name, ep.value, e)
            continue
        pm.register(plugin, name=ep.name)


def register_plugin(plugin: object, name: str) -> None:
    """Register a plugin object at run time (tests, embedding applications)."""
    get_plugin_manager().register(plugin, name=name)
    _registries.clear()


def unregister_plugin(name: str) -> None:
    """Remove a plugin registered with :func:`register_plugin`."""
    pm = get_plugin_manager()
    plugin = pm.get_plugin(name)
    if plugin is not None:
        pm.unregister(plugin, name=name)
    _registries.clear()


def _collect(kind: str, hook_name: str) -> dict[str, Entry]:
    if kind in _registries:
        return _registries[kind]
    pm = get_plugin_manager()
    found: dict[str, Entry] = {}
    hook = getattr(pm.hook, hook_name)
    for impl in reversed(hook.get_hookimpls()):  # built-ins first, later plugins may override

        def register(name: str, fn: Callable[..., Any], _plugin: str = impl.plugin_name, **meta: Any) -> None:
            if name in found:
                logger.info("%s %r from %s replaces the one from %s", kind, name, _plugin, found[name].plugin)
            found[name] = Entry(kind=kind, name=name, fn=fn, plugin=_plugin, meta=meta)

        impl.function(register=register)
    _registries[kind] = found
    return found


def slide_readers() -> dict[str, Entry]:
    return _collect("reader", "register_slide_readers")


def tile_encoders() -> dict[str, Entry]:
    return _collect("tile encoder", "register_tile_encoders")


def models() -> dict[str, Entry]:
    return _collect("model", "register_models")


def judges() -> dict[str, Entry]:
    return _collect("judge", "register_judges")


def sinks() -> dict[str, Entry]:
    return _collect("sink", "register_sinks")
