"""``FeatureCache``: tile features on disk as zarr v3, one group per (slide, encoder, tile size, µm/px).

A group is written under a temporary name (:func:`~wsi_llava.atomic.atomic_folder`) and renamed when every
row is in, so an interrupted or cancelled extraction never leaves anything :meth:`FeatureCache.get` would
return. Its attributes record a checksum of every stored chunk; a group whose content no longer matches
(a chunk deleted, cut short or changed on disk) is a miss, is discarded and gets extracted again. One
process at a time writes an entry: the others wait on its lock file and then read what it wrote.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from wsi_llava.atomic import atomic_folder, folder_leftover_target
from wsi_llava.errors import CacheError
from wsi_llava.locks import file_lock, holding, try_lock
from wsi_llava.progress import CancelToken

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: groups carry an "integrity" record; those without one are never served
_CHUNK_ROWS = 512
_DIGEST = "sha256"
_DIGEST_CHARS = 32
_LOCKS = ".locks"
#: a temporary group this old whose entry nobody holds the lock of was left by a killed writer
STALE_SECONDS = 600.0
_ENTRY_NAME = re.compile(r"[0-9a-f]{20}")
_LEGACY_TMP = re.compile(r"\.tmp-(?P<name>[0-9a-f]{20})-(?P<pid>\d+)-[0-9a-f]+")


class CacheKey(BaseModel):
    """What identifies a set of tile features; any change gives a different group."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    slide_fingerprint: str
    encoder_id: str = Field(description="tile encoder name + weights checksum (or random-seed<k>)")
    tile_size: int = Field(gt=0, description="tile edge in pixels at the target µm/px")
    target_mpp: float = Field(gt=0, description="µm per pixel the tiles were read at")
    grid_hash: str = Field(
        "", description="hash of the tile coordinates (tissue detection / tiling settings)"
    )

    @property
    def name(self) -> str:
        """Short, stable group name derived from every key field."""
        payload = json.dumps(self.model_dump(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()[:20]


def grid_hash(coords: np.ndarray) -> str:
    """A short hash of an (N, 2) tile coordinate array."""
    arr = np.ascontiguousarray(np.asarray(coords, dtype=np.int64))
    return hashlib.sha256(arr.tobytes() + str(arr.shape).encode()).hexdigest()[:16]


def _digest(arr: np.ndarray) -> str:
    """Checksum of an array's bytes as stored (little-endian, C order), without copying it."""
    a = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    return hashlib.sha256(a).hexdigest()[:_DIGEST_CHARS]


_NO_RECORD = "written without an integrity record (by an older version)"


def _mismatch(record: dict[str, Any], coords: np.ndarray, features: np.ndarray) -> str | None:
    """Why ``coords`` / ``features`` as read differ from the integrity ``record`` written with them, or None."""
    rows, digests = record.get("chunk_rows"), record.get("features")
    if record.get("algorithm") != _DIGEST or not isinstance(rows, int) or not isinstance(digests, list):
        return "its integrity record is unreadable"
    if len(digests) != -(-features.shape[0] // rows):
        return f"{len(digests)} feature chunks were recorded for {features.shape[0]} rows"
    if _digest(coords) != record.get("coords"):
        return "the stored tile coordinates differ from what was written"
    bad = [i for i, d in enumerate(digests) if _digest(features[i * rows : (i + 1) * rows]) != d]
    if bad:
        shown = ", ".join(str(i) for i in bad[:5]) + (", ..." if len(bad) > 5 else "")
        return f"{len(bad)} of {len(digests)} feature chunks differ from what was written (chunk {shown})"
    return None


@dataclass
class CachedFeatures:
    """Features of one slide for one encoder, loaded into memory."""

    key: CacheKey
    coords: np.ndarray  # (N, 2) int32, tile top-left, level-0 px
    features: np.ndarray  # (N, D) float16
    attrs: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    encoded: bool = False  # True when the tiles were encoded by this call, not served from the cache

    @property
    def n_tiles(self) -> int:
        return int(self.coords.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def tile_size_level0(self) -> int:
        return int(self.attrs.get("tile_size_level0", 0))


class CacheEntry(BaseModel):
    """One complete group, as :meth:`FeatureCache.list` reports it."""

    name: str
    path: Path
    slide_fingerprint: str
    slide_path: str | None = None
    encoder_id: str
    tile_size: int
    target_mpp: float
    n_tiles: int
    dim: int
    created: str | None = None
    size_bytes: int = 0


class CacheWriter:
    """Receives batches of features for one group; used through :meth:`FeatureCache.write`."""

    def __init__(self, group: Any, n_tiles: int, dim: int) -> None:
        self._group = group
        self.n_tiles = n_tiles
        self.dim = dim
        self._written = np.zeros(n_tiles, dtype=bool)
        self._buffers: dict[int, np.ndarray] = {}
        self._filled: dict[int, np.ndarray] = {}
        self._coords_digest: str | None = None
        self._chunk_digests: dict[int, str] = {}

    @property
    def done(self) -> int:
        """Rows written so far."""
        return int(self._written.sum())

    def write_coords(self, coords: np.ndarray) -> None:
        """Store all tile coordinates ``(N, 2)`` (level-0 top-left)."""
        c = np.asarray(coords)
        if c.shape != (self.n_tiles, 2):
            raise CacheError(f"coords must be ({self.n_tiles}, 2), got {c.shape}")
        c = c.astype(np.int32)
        self._group["coords"][:] = c
        self._coords_digest = _digest(c)

    def write(self, indices: np.ndarray, features: np.ndarray) -> None:
        """Store features ``(B, D)`` for tile ``indices`` (any order); full chunks are flushed to disk."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        feats = np.asarray(features)
        if feats.shape != (len(idx), self.dim):
            raise CacheError(f"features must be ({len(idx)}, {self.dim}), got {feats.shape}")
        if len(idx) and (idx.min() < 0 or idx.max() >= self.n_tiles):
            raise CacheError(f"tile indices out of range 0..{self.n_tiles - 1}")
        feats = feats.astype(np.float16)
        for chunk in np.unique(idx // _CHUNK_ROWS):
            sel = (idx // _CHUNK_ROWS) == chunk
            start = int(chunk) * _CHUNK_ROWS
            rows = min(_CHUNK_ROWS, self.n_tiles - start)
            buf = self._buffers.setdefault(int(chunk), np.zeros((rows, self.dim), np.float16))
            filled = self._filled.setdefault(int(chunk), np.zeros(rows, bool))
            buf[idx[sel] - start] = feats[sel]
            filled[idx[sel] - start] = True
            if filled.all():
                self._flush(int(chunk))
        self._written[idx] = True

    def _flush(self, chunk: int) -> None:
        buf = self._buffers.pop(chunk)
        del self._filled[chunk]
        start = chunk * _CHUNK_ROWS
        self._group["features"][start : start + len(buf)] = buf
        self._chunk_digests[chunk] = _digest(buf)

    def _finish(self) -> dict[str, Any]:
        """Flush what is buffered; the integrity record of everything written."""
        if not self._written.all():
            missing = int((~self._written).sum())
            raise CacheError(f"feature cache write ended with {missing} of {self.n_tiles} tiles missing")
        if self._coords_digest is None:
            raise CacheError("feature cache write ended without the tile coordinates")
        for chunk in list(self._buffers):
            self._flush(chunk)
        n_chunks = -(-self.n_tiles // _CHUNK_ROWS)
        return {
            "algorithm": _DIGEST,
            "chunk_rows": _CHUNK_ROWS,
            "coords": self._coords_digest,
            "features": [self._chunk_digests[i] for i in range(n_chunks)],
        }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _identity(path: Path) -> tuple[int, int] | None:
    """Which directory sits at ``path`` (a replaced entry is another directory), or None."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


class _Superseded(Exception):
    """A verified copy of the entry appeared while this writer wrote it: keep that one."""


class FeatureCache:
    """A directory of zarr v3 groups of tile features (see :class:`CacheKey`).

    Beside the groups: ``.locks/<name>.lock``, one lock file per entry, taken while it is written.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(
                f"{self.root}: cannot create the feature cache directory ({exc.strerror or exc})"
            ) from exc
        if not self.root.is_dir():
            raise CacheError(f"{self.root}: feature cache path exists and is not a directory")
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise CacheError(f"{self.root}: feature cache directory is not writable")
        self._locks: dict[str, Any] = {}
        self._cleaned = False

    def path_for(self, key: CacheKey) -> Path:
        return self.root / key.name

    # -- locking -------------------------------------------------------------------------------
    def _lock_named(self, name: str) -> Any:
        if name not in self._locks:
            self._locks[name] = file_lock(self.root / _LOCKS / f"{name}.lock")
        return self._locks[name]

    @contextlib.contextmanager
    def lock(
        self,
        key: CacheKey,
        *,
        what: str | None = None,
        timeout: float | None = None,
        cancel: CancelToken | None = None,
        on_wait: Callable[[], None] | None = None,
    ) -> Iterator[None]:
        """Hold the entry's inter-process lock (re-entrant), waiting while another process writes it.

        A dead holder's lock is gone with it. Raises ``CacheError`` after ``timeout`` seconds, ``Cancelled``
        when ``cancel`` is set while waiting.
        """
        what = what or f"feature cache entry {key.name}"
        with holding(
            self._lock_named(key.name),
            what,
            timeout=timeout,
            cancel=cancel,
            on_wait=on_wait,
            error=CacheError,
        ):
            yield

    # -- reading -------------------------------------------------------------------------------
    def _open(self, path: Path) -> Any:
        import zarr

        return zarr.open_group(store=str(path), mode="r")

    def _load(self, path: Path, key: CacheKey) -> tuple[CachedFeatures | None, str, dict[str, Any]]:
        """``(features, "", attrs)`` for a complete, verified group of ``key``, else ``(None, why, attrs)``."""
        try:
            group = self._open(path)
            attrs = dict(group.attrs)
        except Exception as exc:  # noqa: BLE001 - a damaged group is a miss, never a crash
            return None, f"unreadable: {exc}", {}
        if attrs.get("complete") is not True:
            return None, "incomplete", attrs
        stored = {f: attrs.get(f) for f in CacheKey.model_fields}
        if stored != key.model_dump():
            return None, f"written for {stored}", attrs
        if not isinstance(attrs.get("integrity"), dict):
            return None, _NO_RECORD, attrs
        try:
            coords = np.asarray(group["coords"][:], dtype=np.int32)
            features = np.asarray(group["features"][:], dtype=np.float16)
        except Exception as exc:  # noqa: BLE001
            return None, f"unreadable: {exc}", attrs
        if coords.shape != (attrs.get("n_tiles"), 2) or features.shape != (
            attrs.get("n_tiles"),
            attrs.get("dim"),
        ):
            return None, f"its arrays are {coords.shape} and {features.shape}", attrs
        problem = _mismatch(attrs["integrity"], coords, features)
        if problem is not None:
            return None, problem, attrs
        return CachedFeatures(key=key, coords=coords, features=features, attrs=attrs, path=path), "", attrs

    def get(self, key: CacheKey) -> CachedFeatures | None:
        """The complete, verified features for ``key``, or None.

        A group that is present but unusable (damaged, incomplete, written for another key or by a version
        that recorded no checksums) is reported once, naming its slide, and removed so it is extracted again.
        """
        path = self.path_for(key)
        if not path.exists():
            return None
        ident = _identity(path)
        found, problem, attrs = self._load(path, key)
        if found is not None:
            return found
        slide = attrs.get("slide_path") or f"the slide of fingerprint {key.slide_fingerprint}"
        logger.warning(
            "feature cache entry of %s is not usable (%s); discarding it, its features will be extracted "
            "again (%s)",
            slide,
            problem,
            path,
        )
        self._discard(key.name, path, ident)
        return None

    def _discard(self, name: str, path: Path, ident: tuple[int, int] | None) -> None:
        """Remove the unusable group at ``path`` unless a writer holds its lock or has replaced it since."""
        lock = self._lock_named(name)
        if not try_lock(lock):
            return  # its writer is replacing it now
        try:
            if _identity(path) == ident:
                self._remove_path(path)
        finally:
            lock.release()

    def _remove_path(self, path: Path) -> None:
        """Move ``path`` aside under a leftover name (cleaned if this is interrupted), then delete it."""
        try:
            aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=self.root))
            os.replace(path, aside / path.name)
        except OSError as exc:
            logger.warning("cannot remove %s (%s)", path, exc.strerror or exc)
            return
        shutil.rmtree(aside, ignore_errors=True)

    def list(self) -> list[CacheEntry]:
        """All complete groups in the cache (their attributes; :meth:`get` verifies the content)."""
        out: list[CacheEntry] = []
        for path in sorted(self.root.iterdir()):
            if path.name.startswith(".") or not (path / "zarr.json").is_file():
                continue
            try:
                attrs = dict(self._open(path).attrs)
                if attrs.get("complete") is not True:
                    continue
                size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
                out.append(
                    CacheEntry(
                        name=path.name,
                        path=path,
                        slide_fingerprint=attrs["slide_fingerprint"],
                        slide_path=attrs.get("slide_path"),
                        encoder_id=attrs["encoder_id"],
                        tile_size=attrs["tile_size"],
                        target_mpp=attrs["target_mpp"],
                        n_tiles=attrs["n_tiles"],
                        dim=attrs["dim"],
                        created=attrs.get("created"),
                        size_bytes=size,
                    )
                )
            except Exception as exc:  # noqa: BLE001
                logger.warning("skipping unreadable cache group %s (%s)", path, exc)
        return out

    # -- writing -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def write(
        self, key: CacheKey, n_tiles: int, dim: int, *, attrs: dict[str, Any] | None = None
    ) -> Iterator[CacheWriter]:
        """Write a group under a temporary name; it becomes visible only if the block ends with all rows in.

        Holds the entry's lock throughout and replaces whatever unusable group sits under its name. On any
        exception (including ``Cancelled`` and KeyboardInterrupt) the temporary group is removed. The first
        write of this cache object also removes the leftovers of killed writers (:meth:`clean`).
        """
        import zarr

        if n_tiles < 1 or dim < 1:
            raise CacheError(f"cannot cache {n_tiles} tiles of dimension {dim}")
        final = self.path_for(key)
        with self.lock(key):
            self._clean_once()
            try:
                with contextlib.ExitStack() as stack:
                    try:
                        tmp = stack.enter_context(atomic_folder(final, replace=True))
                        group = zarr.open_group(store=str(tmp), mode="w", zarr_format=3)
                        group.create_array(
                            "coords",
                            shape=(n_tiles, 2),
                            chunks=(max(1, min(n_tiles, 65536)), 2),
                            dtype="int32",
                        )
                        group.create_array(
                            "features",
                            shape=(n_tiles, dim),
                            chunks=(min(n_tiles, _CHUNK_ROWS), dim),
                            dtype="float16",
                        )
                    except OSError as exc:
                        raise CacheError(
                            f"{self.root}: cannot write the feature cache ({exc.strerror or exc})"
                        ) from exc
                    writer = CacheWriter(group, n_tiles, dim)
                    yield writer
                    integrity = writer._finish()
                    group.attrs.update(
                        {
                            "format_version": FORMAT_VERSION,
                            **(attrs or {}),
                            **key.model_dump(),
                            "n_tiles": int(n_tiles),
                            "dim": int(dim),
                            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            "integrity": integrity,
                            "complete": True,
                        }
                    )
                    if final.exists() and self._load(final, key)[0] is not None:
                        raise _Superseded  # a nested writer of this process finished it first
            except _Superseded:
                logger.info("feature cache %s was completed meanwhile; keeping that copy", final)
                return
            logger.info("cached %d x %d features in %s", n_tiles, dim, final)

    # -- housekeeping --------------------------------------------------------------------------
    def remove(self, key: CacheKey) -> bool:
        """Delete the group of ``key`` (waiting for its writer); True if there was one."""
        path = self.path_for(key)
        with self.lock(key):
            if not path.exists():
                return False
            self._remove_path(path)
            return True

    def _clean_once(self) -> None:
        if self._cleaned:
            return
        self._cleaned = True
        try:
            removed = self.clean()
        except OSError as exc:  # housekeeping never fails a write
            logger.warning("%s: could not clean up leftovers (%s)", self.root, exc.strerror or exc)
            return
        if removed:
            logger.info("%s: removed %d leftover(s) of interrupted writes", self.root, removed)

    def clean(self, min_age: float = STALE_SECONDS) -> int:
        """Remove what killed writers left; returns how many folders went.

        That is: temporary groups whose entry's lock nobody holds and that are ``min_age`` seconds old (or
        whose writer's pid, in the older naming, is gone), and groups under an entry's name never completed.
        """
        removed = 0
        now = time.time()
        for path in list(self.root.iterdir()):
            if not path.is_dir() or path.name == _LOCKS:
                continue
            name = folder_leftover_target(path.name)
            legacy = _LEGACY_TMP.fullmatch(path.name)
            if legacy is not None:
                name = legacy.group("name")
            if name is not None:
                if not _ENTRY_NAME.fullmatch(name):
                    continue
                try:
                    old = now - path.stat().st_mtime >= min_age
                except FileNotFoundError:
                    continue
                if (old or (legacy is not None and not _pid_alive(int(legacy.group("pid"))))) and (
                    self._remove_unlocked(name, path)
                ):
                    removed += 1
            elif (
                _ENTRY_NAME.fullmatch(path.name)
                and not self._completed(path)
                and self._remove_unlocked(path.name, path, unless=self._completed)
            ):
                removed += 1
        return removed

    def _completed(self, path: Path) -> bool:
        try:
            return dict(self._open(path).attrs).get("complete") is True
        except Exception:  # noqa: BLE001
            return False

    def _remove_unlocked(self, name: str, path: Path, unless: Callable[[Path], bool] | None = None) -> bool:
        """Delete ``path`` if nobody holds the lock of entry ``name`` (and, once locked, ``unless`` is
        false: a writer may have replaced it meanwhile); whether it went."""
        lock = self._lock_named(name)
        if not try_lock(lock):
            return False
        try:
            if unless is not None and unless(path):
                return False
            shutil.rmtree(path, ignore_errors=True)
        finally:
            lock.release()
        return not path.exists()
