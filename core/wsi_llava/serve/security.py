"""Who may ask and what they may open: the bearer token, and slide paths confined to ``--slides-root``."""

from __future__ import annotations

import hmac
import logging
import os
import stat
from pathlib import Path

from wsi_llava.errors import WsiLlavaError

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """An error reply: HTTP ``status``, ``ErrorBody`` ``code`` and one-sentence ``message``."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def read_token(path: Path) -> str:
    """The bearer token in ``path`` (surrounding whitespace stripped); warns when others may read the file."""
    try:
        mode = path.stat().st_mode
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise WsiLlavaError(f"{path}: no such token file (--token-file)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise WsiLlavaError(f"{path}: cannot read the token file (--token-file): {e}") from None
    if not token:
        raise WsiLlavaError(f"{path}: the token file is empty (--token-file)")
    if len(token) < 16:
        raise WsiLlavaError(f"{path}: the token is shorter than 16 characters; use a long random one")
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        logger.warning("%s: the token file is readable by other users; chmod 600 it", path)
    return token


def check_bearer(header: str | None, token: str | None) -> None:
    """Raise ``ApiError`` 401 without a bearer token, 403 with a wrong one; nothing when no token is set."""
    if token is None:
        return
    if not header:
        raise ApiError(401, "unauthorized", "this server needs a bearer token (Authorization: Bearer ...)")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise ApiError(401, "unauthorized", "the Authorization header must be 'Bearer <token>'")
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ApiError(403, "forbidden", "wrong bearer token")


def confine(slide: str, root: Path) -> Path:
    """``slide`` (relative to ``root`` or absolute) resolved, symlinks included, and refused unless it lies
    under ``root``: 403 outside, 404 missing. Nothing is opened here, only ``resolve(strict=True)``."""
    if not slide or "\0" in slide:
        raise ApiError(422, "invalid", "slide: give a path under the server's slides root")
    root = root.resolve(strict=True)
    given = Path(slide).expanduser()
    candidate = given if given.is_absolute() else root / given
    # refuse what is outside before asking whether it exists, so a probe learns nothing about other paths
    lexical = Path(os.path.normpath(candidate))
    if not lexical.is_relative_to(root):
        raise ApiError(403, "forbidden", f"slide {slide!r}: outside the server's slides root")
    try:
        resolved = candidate.resolve(strict=True)
    except FileNotFoundError:
        if not candidate.resolve(strict=False).is_relative_to(root):  # a missing file behind a link out
            raise ApiError(403, "forbidden", f"slide {slide!r}: outside the server's slides root") from None
        raise ApiError(404, "not_found", f"slide {slide!r}: no such file under the slides root") from None
    except (OSError, RuntimeError) as e:  # a symlink loop, a name too long, ...
        raise ApiError(400, "bad_request", f"slide {slide!r}: cannot resolve the path ({e})") from None
    if not resolved.is_relative_to(root):
        raise ApiError(403, "forbidden", f"slide {slide!r}: outside the server's slides root")
    return resolved
