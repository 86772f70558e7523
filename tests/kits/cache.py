"""Helpers of the feature-cache tests: a tiny real pyramid, damage done to a stored entry, a held lock."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import tifffile
from skimage import data


def write_pyramid(path: Path, *, compression: str | None = "zlib") -> Path:
    """A 1024x768 three-level pyramid with real IHC texture at 0.5 µm/px (48 tiles of 128 px)."""
    img = np.ascontiguousarray(np.tile(data.immunohistochemistry(), (2, 2, 1))[:768, :1024])
    levels = [img]
    for _ in range(2):
        p = levels[-1]
        h, w = p.shape[:2]
        levels.append(p.reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)).astype(np.uint8))
    with tifffile.TiffWriter(path) as tw:
        for i, lv in enumerate(levels):
            r = 1e4 / (0.5 * 2**i)
            tw.write(
                lv,
                tile=(256, 256),
                photometric="rgb",
                compression=compression,
                resolution=(r, r),
                resolutionunit="CENTIMETER",
                subfiletype=0 if i == 0 else 1,
                metadata=None,
            )
    return path


def feature_chunks(entry: Path) -> list[Path]:
    """The stored chunk files of an entry's ``features`` array, in row order."""
    files = [p for p in (entry / "features").rglob("*") if p.is_file() and p.name != "zarr.json"]
    return sorted(files, key=lambda p: [int(x) for x in p.relative_to(entry / "features" / "c").parts])


def damage(path: Path, kind: str) -> None:
    """Delete a stored chunk file, cut it in half, or flip bytes in its middle."""
    if kind == "delete":
        path.unlink()
    elif kind == "truncate":
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    elif kind == "flip":
        raw = bytearray(path.read_bytes())
        mid = len(raw) // 2
        raw[mid : mid + 16] = bytes(b ^ 0xFF for b in raw[mid : mid + 16])
        path.write_bytes(bytes(raw))
    else:  # pragma: no cover
        raise ValueError(kind)


HOLD_WRITE = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from wsi_llava.features.cache import CacheKey, FeatureCache

    key = CacheKey(**{"slide_fingerprint": sys.argv[2], "encoder_id": "enc", "tile_size": 8, "target_mpp": 1.0})
    with FeatureCache(sys.argv[1]).write(key, 1100, 8, attrs={"slide_path": "/x/held.svs"}) as w:
        w.write_coords(np.zeros((1100, 2)))
        w.write(np.arange(600), np.ones((600, 8)))
        print("ready", flush=True)
        time.sleep(600)
    """
)


def start_held_write(root: Path, fingerprint: str) -> subprocess.Popen:
    """A real process in the middle of writing an entry (its lock held, its temporary group on disk)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_WRITE, str(root), fingerprint], stdout=subprocess.PIPE, text=True
    )
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise AssertionError(f"the writer process did not start (said {line!r}, rc {proc.wait()})")
    return proc
