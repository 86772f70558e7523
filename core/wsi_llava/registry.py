"""User models: ``$WSI_LLAVA_HOME/models/NAME/wsi_llava.json``, each referencing its parts where they lie.

``wsi-llava models add`` checks every part (files, shapes, widths) and writes one folder per model
holding only a ``ModelSpec`` whose sources are absolute paths or ``hf://`` repo ids (nothing is copied).
The folder is then a checkpoint like any other: :func:`wsi_llava.model.load_model` loads it by name
in every front end. ``$WSI_LLAVA_HOME`` defaults to ``$XDG_CONFIG_HOME/wsi-llava`` (``~/.config/wsi-llava``).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Unpack

from pydantic import BaseModel, ConfigDict, Field

from wsi_llava.errors import ModelError

if TYPE_CHECKING:
    from wsi_llava.model.parts import PartSources

logger = logging.getLogger(__name__)

MODELS_DIR = "models"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def home() -> Path:
    """wsi-llava's configuration folder: ``$WSI_LLAVA_HOME``, else ``$XDG_CONFIG_HOME/wsi-llava``."""
    env = os.environ.get("WSI_LLAVA_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "wsi-llava"


def models_dir() -> Path:
    """Where user models are registered, one folder each."""
    return home() / MODELS_DIR


def check_name(name: str) -> str:
    """A model name usable as a folder name and on a command line; errors say what is allowed."""
    if not _NAME.match(name or ""):
        raise ModelError(
            f"model name {name!r}: use letters, digits, '.', '_' and '-' (at most 64, starting with a "
            "letter or digit)"
        )
    return name


def user_models() -> dict[str, Path]:
    """Registered user models by name (folders holding a ``wsi_llava.json``)."""
    from wsi_llava.model.spec import SPEC_FILE

    root = models_dir()
    if not root.is_dir():
        return {}
    return {
        p.name: p
        for p in sorted(root.iterdir())
        if p.is_dir() and _NAME.match(p.name) and (p / SPEC_FILE).is_file()
    }


def user_model(name: str) -> Path | None:
    """The folder of the user model ``name``, or None."""
    return user_models().get(name)


def registered_model(name: str, to: str) -> Path:
    """The folder of the user model ``name``; else ``ModelError`` saying why there is nothing ``to`` do
    (``to``: "check", "remove"): ``name`` is built in, or no model is registered under it."""
    from wsi_llava import plugins

    folder = user_model(name)
    if folder is not None:
        return folder
    if name in plugins.models():
        raise ModelError(f"model {name!r} is built in: it ships complete, there is nothing to {to}")
    raise ModelError(
        f"no user model named {name!r} to {to} (registered: {', '.join(user_models()) or 'none'}; "
        "see `wsi-llava models`)"
    )


class ModelEntry(BaseModel):
    """One model as ``wsi-llava models`` lists it."""

    model_config = ConfigDict(extra="forbid")

    name: str
    kind: Literal["built-in", "user"]
    description: str = ""
    folder: str | None = None
    sources: dict[str, str] = Field(default_factory=dict, description="part -> source as stored")
    resolves: bool = True
    problem: str | None = None


def list_models() -> list[ModelEntry]:
    """Built-in (plugin) models and user models, each with whether its sources resolve here."""
    from wsi_llava import plugins
    from wsi_llava.model.parts import spec_sources
    from wsi_llava.model.spec import ModelSpec
    from wsi_llava.sources import resolve_source

    entries = [
        ModelEntry(name=e.name, kind="built-in", description=e.description) for e in plugins.models().values()
    ]
    for name, folder in user_models().items():
        entry = ModelEntry(name=name, kind="user", folder=str(folder))
        try:
            spec = ModelSpec.load(folder)
            entry.sources = spec_sources(spec)
            entry.description = spec.description or ""
            for part, src in entry.sources.items():
                resolve_source(src, part)
        except ModelError as e:
            entry.resolves = False
            entry.problem = str(e)
        entries.append(entry)
    return entries


def add_model(name: str, *, overwrite: bool = False, **parts: Unpack[PartSources]) -> Any:
    """Check every part and register the model as ``models_dir()/name``; returns the ``ModelReport``.

    Nothing is written when a part is missing or the widths do not fit (``ModelError`` says which).
    """
    from wsi_llava import plugins
    from wsi_llava.atomic import atomic_folder
    from wsi_llava.model.parts import assemble_spec

    check_name(name)
    if name in plugins.models():
        raise ModelError(f"model name {name!r} is taken by a built-in model; choose another name")
    target = models_dir() / name
    if target.exists() and not overwrite:
        raise ModelError(
            f"model {name!r} is already registered ({target}); remove it first or pass --overwrite"
        )
    spec, report = assemble_spec(name, **parts)
    try:
        with atomic_folder(target, replace=overwrite) as tmp:
            spec.save(tmp)
    except OSError as e:
        raise ModelError(f"{target}: cannot register the model ({e})") from None
    report.folder = str(target)
    logger.info("registered model %s in %s", name, target)
    return report


def remove_model(name: str) -> Path:
    """Forget the user model ``name`` (its folder under ``models_dir()``; the weights it names stay)."""
    folder = registered_model(name, "remove")
    shutil.rmtree(folder)
    return folder
