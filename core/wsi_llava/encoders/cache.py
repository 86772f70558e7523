"""``FeatureCache``: tile features on disk as zarr v3, one group per (slide, encoder, tile size, µm/px).

A group is written under a temporary name and renamed when every row is in, so an interrupted or
cancelled extraction never leaves anything that :meth:`FeatureCache.get` would return.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from wsi_llava.errors import CacheError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_TMP_PREFIX = ".tmp-"
_CHUNK_ROWS = 512


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


@dataclass
class CachedFeatures:
    """Features of one slide for one encoder, loaded into memory."""

    key: CacheKey
    coords: np.ndarray  # (N, 2) int32, tile top-left, level-0 px
    features: np.ndarray  # (N, D) float16
    attrs: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

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

    @property
    def done(self) -> int:
        """Rows written so far."""
        return int(self._written.sum())

    def write_coords(self, coords: np.ndarray) -> None:
        """Store all tile coordinates ``(N, 2)`` (level-0 top-left)."""
        c = np.asarray(coords)
        if c.shape != (self.n_tiles, 2):
            raise CacheError(f"coords must be ({self.n_tiles}, 2), got {c.shape}")
        self._group["coords"][:] = c.astype(np.int32)

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
                self._group["features"][start : start + rows] = buf
                del self._buffers[int(chunk)], self._filled[int(chunk)]
        self._written[idx] = True

    def _finish(self) -> None:
        if not self._written.all():
            missing = int((~self._written).sum())
            raise CacheError(f"feature cache write ended with {missing} of {self.n_tiles} tiles missing")
        for chunk, buf in list(self._buffers.items()):
            start = chunk * _CHUNK_ROWS
            self._group["features"][start : start + len(buf)] = buf
        self._buffers.clear()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FeatureCache:
    """A directory of zarr v3 groups of tile features (see :class:`CacheKey`)."""

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

    def path_for(self, key: CacheKey) -> Path:
        return self.root / key.name

    # -- reading -------------------------------------------------------------------------------
    def _open(self, path: Path) -> Any:
        import zarr

        return zarr.open_group(store=str(path), mode="r")

    def _is_complete(self, key: CacheKey) -> bool:
        """Whether a complete group of ``key`` is in place (its attributes only; no feature read)."""
        path = self.path_for(key)
        if not (path / "zarr.json").is_file():
            return False
        try:
            attrs = dict(self._open(path).attrs)
        except Exception:  # noqa: BLE001 - damaged: not complete
            return False
        return (
            attrs.get("complete") is True
            and {f: attrs.get(f) for f in CacheKey.model_fields} == key.model_dump()
        )

    def get(self, key: CacheKey) -> CachedFeatures | None:
        """The complete features for ``key``, or None (absent, incomplete, or made for another key)."""
        path = self.path_for(key)
        if not (path / "zarr.json").is_file():
            return None
        try:
            group = self._open(path)
            attrs = dict(group.attrs)
            if attrs.get("complete") is not True:
                logger.info("feature cache %s is incomplete; ignoring it", path)
                return None
            stored = {f: attrs.get(f) for f in CacheKey.model_fields}
            if stored != key.model_dump():
                logger.warning("feature cache %s was written for %s, not %s; ignoring it", path, stored, key)
                return None
            coords = np.asarray(group["coords"][:], dtype=np.int32)
            features = np.asarray(group["features"][:], dtype=np.float16)
        except Exception as exc:  # noqa: BLE001 - a damaged group is a miss, never a crash
            logger.warning("feature cache %s is unreadable (%s); ignoring it", path, exc)
            return None
        if coords.shape[0] != attrs.get("n_tiles") or features.shape[0] != coords.shape[0]:
            logger.warning("feature cache %s has inconsistent shapes; ignoring it", path)
            return None
        return CachedFeatures(key=key, coords=coords, features=features, attrs=attrs, path=path)

    def list(self) -> list[CacheEntry]:
        """All complete groups in the cache."""
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

        On any exception (including ``Cancelled`` and KeyboardInterrupt) the temporary group is removed.
        """
        import zarr

        if n_tiles < 1 or dim < 1:
            raise CacheError(f"cannot cache {n_tiles} tiles of dimension {dim}")
        final = self.path_for(key)
        tmp = self.root / f"{_TMP_PREFIX}{key.name}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            group = zarr.open_group(store=str(tmp), mode="w", zarr_format=3)
            group.create_array(
                "coords", shape=(n_tiles, 2), chunks=(max(1, min(n_tiles, 65536)), 2), dtype="int32"
            )
            group.create_array(
                "features", shape=(n_tiles, dim), chunks=(min(n_tiles, _CHUNK_ROWS), dim), dtype="float16"
            )
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CacheError(f"{self.root}: cannot write the feature cache ({exc.strerror or exc})") from exc
        writer = CacheWriter(group, n_tiles, dim)
        try:
            yield writer
            writer._finish()
            meta = {
                "format_version": FORMAT_VERSION,
                **(attrs or {}),
                **key.model_dump(),
                "n_tiles": int(n_tiles),
                "dim": int(dim),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "complete": True,
            }
            group.attrs.update(meta)
            if self._is_complete(key):  # a concurrent writer finished the same key first: keep its copy
                shutil.rmtree(tmp, ignore_errors=True)
                return
            if final.exists():
                shutil.rmtree(final, ignore_errors=True)  # an unreadable leftover of the same key
            try:
                os.replace(tmp, final)
            except OSError:
                if not self._is_complete(key):  # not a concurrent writer winning the race: a real failure
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
                return
            logger.info("cached %d x %d features in %s", n_tiles, dim, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    # -- housekeeping --------------------------------------------------------------------------
    def remove(self, key: CacheKey) -> bool:
        """Delete the group of ``key``; True if there was one."""
        path = self.path_for(key)
        if path.exists():
            shutil.rmtree(path)
            return True
        return False

    def clean(self, include_live: bool = False) -> int:
        """Remove temporary groups left by killed processes, and incomplete groups; returns how many."""
        removed = 0
        for path in self.root.iterdir():
            if not path.is_dir():
                continue
            if path.name.startswith(_TMP_PREFIX):
                try:
                    pid = int(path.name.rsplit("-", 2)[-2])
                except ValueError:
                    pid = -1
                if include_live or pid < 0 or not _pid_alive(pid):
                    shutil.rmtree(path, ignore_errors=True)
                    removed += 1
            elif (path / "zarr.json").is_file():
                try:
                    complete = dict(self._open(path).attrs).get("complete") is True
                except Exception:  # noqa: BLE001
                    complete = False
                if not complete:
                    shutil.rmtree(path, ignore_errors=True)
                    removed += 1
        return removed
