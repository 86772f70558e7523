"""Where model parts come from: a local path, or a Hugging Face repo id resolved from the local cache.

A source is written as the user gives it (``./gigapath``, ``~/llava-v1.5-7b``,
``prov-gigapath/prov-gigapath``) and stored in canonical form: an absolute path, or
``hf://ORG/NAME[@REVISION][/PATH/IN/REPO]`` (the ``huggingface_hub`` file-system notation). Repo ids
are resolved with ``huggingface_hub`` from the local cache only: nothing is ever downloaded.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from wsi_llava.errors import ModelError

HF_PREFIX = "hf://"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*(@[A-Za-z0-9_.\-/]+)?$")


@dataclass(frozen=True)
class HubRef:
    """A file or folder inside a Hugging Face repo: ``repo_id``, optional ``revision``, ``path``."""

    repo_id: str
    revision: str | None = None
    path: str = ""

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"{HF_PREFIX}{self.repo_id}{rev}" + (f"/{self.path}" if self.path else "")


def parse_hub(source: str) -> HubRef | None:
    """The ``HubRef`` of an ``hf://ORG/NAME[@REV][/PATH]`` source, None for a local path."""
    if not source.startswith(HF_PREFIX):
        return None
    parts = source[len(HF_PREFIX) :].strip("/").split("/")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ModelError(f"source {source!r}: expected hf://ORG/NAME[@REVISION][/PATH]")
    name, _, revision = parts[1].partition("@")
    return HubRef(f"{parts[0]}/{name}", revision or None, "/".join(parts[2:]))


def looks_like_repo_id(text: str) -> bool:
    """Whether ``text`` has the shape of a hub repo id (``ORG/NAME``, optional ``@REVISION``)."""
    return bool(_REPO_ID.match(text)) and not text.startswith((".", "~"))


def canonical_source(text: str | Path, what: str = "source") -> str:
    """The stored form of what a user typed: an absolute path when it exists here, else ``hf://ORG/NAME``.

    A path that exists wins over a repo id of the same spelling, as ``from_pretrained`` does.
    """
    raw = str(text).strip()
    if not raw:
        raise ModelError(f"{what}: empty")
    if raw.startswith(HF_PREFIX):
        return str(parse_hub(raw))
    path = Path(raw).expanduser()
    if path.exists():
        return str(path.resolve())
    if looks_like_repo_id(raw):
        repo, _, rev = raw.partition("@")
        return str(HubRef(repo, rev or None))
    raise ModelError(f"{what} {raw!r}: no such file or folder, and not a Hugging Face repo id (ORG/NAME)")


def hub_cache_dir() -> Path:
    """The local Hugging Face hub cache, read from the environment now: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``."""
    env = os.environ.get("HF_HUB_CACHE")
    if env:
        return Path(env).expanduser()
    hf_home = os.environ.get("HF_HOME")
    if hf_home:
        return Path(hf_home).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _not_cached(ref: HubRef, what: str) -> ModelError:
    return ModelError(
        f"{what} {ref.repo_id!r}"
        + (f" (revision {ref.revision})" if ref.revision else "")
        + f": not in the local Hugging Face cache ({hub_cache_dir()}); nothing is downloaded at run time. "
        f"Download it on a machine with network (`hf download {ref.repo_id}`, or "
        f"`huggingface-cli download {ref.repo_id}` with an older huggingface_hub) and copy the cache "
        "folder here (or point $HF_HOME at it), or pass a local folder instead"
    )


def resolve_source(source: str | Path, what: str = "source") -> Path:
    """The local path of a source: the path itself, or the file/folder inside the cached hub snapshot."""
    text = str(source)
    ref = parse_hub(text)
    if ref is None:
        path = Path(text).expanduser()
        if not path.exists():
            raise ModelError(f"{what} {text}: no such file or folder (moved or deleted since it was added?)")
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        folder = Path(
            snapshot_download(
                ref.repo_id, revision=ref.revision, cache_dir=hub_cache_dir(), local_files_only=True
            )
        )
    except (LocalEntryNotFoundError, FileNotFoundError):
        raise _not_cached(ref, what) from None
    except Exception as e:  # a malformed repo id or a broken cache entry
        raise ModelError(
            f"{what} {ref}: cannot resolve it in the local cache ({type(e).__name__}: {e})"
        ) from None
    path = folder / ref.path if ref.path else folder
    if not path.exists():
        raise ModelError(
            f"{what} {ref}: the cached snapshot {folder} has no {ref.path!r} "
            f"(download the whole repo, e.g. `hf download {ref.repo_id}`)"
        )
    return path


def join_source(source: str, name: str) -> str:
    """``name`` inside the folder ``source`` (a path or an ``hf://`` folder), in canonical form."""
    ref = parse_hub(source)
    if ref is None:
        return str(Path(source) / name)
    return str(HubRef(ref.repo_id, ref.revision, f"{ref.path}/{name}".strip("/")))


def hub_blob_sha256(path: Path) -> str | None:
    """The sha256 of a cached hub file when its blob name is one (LFS files), without reading it."""
    try:
        target = Path(os.path.realpath(path))
    except OSError:
        return None
    name = target.name
    if target.parent.name == "blobs" and len(name) == 64 and all(c in "0123456789abcdef" for c in name):
        return name
    return None
