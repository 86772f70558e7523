"""Where the public WSI-Bench test files are: ``$WSI_LLAVA_BENCH_DIR``, else ``shared/data/wsi-bench`` beside the repo.

The folder holds ``WSI-Bench-test.jsonl``, ``WSI-Bench-Report-only.jsonl``, ``test/`` and ``train-partial/``;
tests that need it skip (saying where they looked) when it is not there.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

BENCH_ENV = "WSI_LLAVA_BENCH_DIR"


def bench_dir() -> Path:
    """``$WSI_LLAVA_BENCH_DIR`` when set, else ``../shared/data/wsi-bench`` next to this checkout."""
    env = os.environ.get(BENCH_ENV)
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[3] / "shared/data/wsi-bench"  # ../shared beside the checkout


BENCH = bench_dir()
SKIP_REASON = f"WSI-Bench files not found at {BENCH} (set ${BENCH_ENV} to the folder that holds them)"
needs_bench = pytest.mark.skipif(not BENCH.is_dir(), reason=SKIP_REASON)
