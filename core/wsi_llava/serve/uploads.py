"""Uploaded slides: streamed to disk under a size cap, stored once per content (sha256 + the file's extension)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from wsi_llava.serve.schemas import UPLOAD_PREFIX, SlideRef
from wsi_llava.serve.security import ApiError

logger = logging.getLogger(__name__)

_SHA = re.compile(r"^[0-9a-f]{64}$")
_SUFFIX = re.compile(r"^\.[A-Za-z0-9]{1,12}$")


def safe_suffix(filename: str | None) -> str:
    """The extension(s) of ``filename`` that pick a slide reader (``.svs``, ``.ome.tiff``), lower-cased; others
    dropped. Only the extension is kept, so no part of a client's name becomes a path."""
    name = Path((filename or "").replace("\\", "/")).name
    suffixes = [s for s in Path(name).suffixes[-2:] if _SUFFIX.match(s)]
    if len(suffixes) == 2 and suffixes[0].lower() not in (".ome",):
        suffixes = suffixes[1:]
    return "".join(suffixes).lower()


class UploadStore:
    """``<dir>/<sha256><ext>``: written through a temp file in the same folder and renamed into place."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes

    def find(self, ref: str) -> Path:
        """The stored file of ``upload:<sha256>``; 404 when there is none, 422 when it is no sha256."""
        sha = ref.removeprefix(UPLOAD_PREFIX).strip().lower()
        if not _SHA.match(sha):
            raise ApiError(
                422, "invalid", f"slide {ref!r}: 'upload:' must be followed by a sha256 (64 hex digits)"
            )
        if self.root.is_dir():
            for entry in self.root.iterdir():
                if entry.name == sha or entry.name.startswith(sha + "."):
                    return entry.resolve()
        raise ApiError(
            404, "not_found", f"slide {ref!r}: no such upload on this server (POST /v1/slides first)"
        )

    async def store(self, chunks: AsyncIterator[bytes], filename: str | None, length: int | None) -> SlideRef:
        """Stream ``chunks`` to disk, hashing them; 413 past the cap (the partial file is removed)."""
        if length is not None and length > self.max_bytes:
            raise ApiError(413, "too_large", self._too_large())
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=self.root, prefix=".upload-", suffix=".part")
        tmp = Path(tmp_name)
        digest = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(fd, "wb") as f:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise ApiError(413, "too_large", self._too_large())
                    digest.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            if size == 0:
                raise ApiError(422, "invalid", "the upload is empty: send the slide's bytes as the body")
            sha = digest.hexdigest()
            name = sha + safe_suffix(filename)
            with contextlib.suppress(ApiError):
                existing = self.find(UPLOAD_PREFIX + sha)
                return SlideRef(
                    slide=UPLOAD_PREFIX + sha,
                    sha256=sha,
                    size=existing.stat().st_size,
                    filename=existing.name,
                    existing=True,
                )
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.root / name)
            logger.info("stored upload %s (%d bytes)", name, size)
            return SlideRef(slide=UPLOAD_PREFIX + sha, sha256=sha, size=size, filename=name)
        finally:
            tmp.unlink(missing_ok=True)

    def _too_large(self) -> str:
        return f"upload over the server's limit of {self.max_bytes / 1024 / 1024:g} MB (--max-upload-mb)"
