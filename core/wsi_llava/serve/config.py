"""``ServeConfig``: every setting of ``wsi-llava serve``, checked once at start-up."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

MB = 1024 * 1024


class ServeConfig(BaseModel):
    """What the ``serve`` command's options become; the app and the engine read only this."""

    model_config = ConfigDict(extra="forbid")

    models: list[str] = Field(default_factory=lambda: ["demo"], min_length=1, description="first = default")
    slides_root: Path
    host: str = "127.0.0.1"
    port: int = Field(8765, ge=0, le=65535)
    device: str = "auto"
    cache: Path | None = None
    token_file: Path | None = None
    max_batch: int = Field(16, ge=1)
    queue: int = Field(64, ge=0, description="requests waiting beyond the decode batch before 429")
    timeout: float = Field(600.0, gt=0, description="seconds per request")
    max_upload_mb: float = Field(4096, gt=0)
    max_body_mb: float = Field(32, gt=0)
    cors_origins: list[str] = Field(default_factory=list)
    uploads: Path | None = None
    drain_seconds: float = Field(30.0, ge=0)
    max_sessions: int = Field(8, ge=1, description="open slides kept (least recently used closed first)")
    log_level: str = "warning"

    @field_validator("models")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"--model given twice: {', '.join(v)}")
        return v

    @property
    def loopback(self) -> bool:
        """Whether the bind address is reachable from this machine only."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MB)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * MB)

    def uploads_dir(self) -> Path:
        """Where uploaded slides are stored: ``--uploads``, else ``uploads/`` under the cache."""
        if self.uploads is not None:
            return self.uploads
        from wsi_llava.settings import cache_dir

        return cache_dir(self.cache) / "uploads"
