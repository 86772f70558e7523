"""Helpers shared by the test modules: tiny models, checkpoints in their publishers' layouts, test doubles.

pytest collects none of it (no ``test_`` module names); ``tests/`` is on ``sys.path`` under pytest, so test
modules and ``conftest.py`` import ``kits.llm``, ``kits.llava``, ... Fixtures over these helpers live in
``conftest.py``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def benchmark_module(name: str) -> ModuleType:
    """The script ``benchmarks/NAME.py`` as a module (the benchmarks are scripts, not a package), loaded once."""
    key = f"_benchmarks_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "benchmarks" / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]
