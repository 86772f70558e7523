"""Packaging and import hygiene: the layout DESIGN §2 asks for, and no torch at import time."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys


def test_no_top_level_core_module_installed(tmp_path):
    # run outside the checkout, where the working directory would otherwise shadow the install
    code = (
        "import importlib.util as u; print(u.find_spec('core') is None, u.find_spec('wsi_llava') is not None)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert out.stdout.split() == ["True", "True"]


def test_wsi_llava_is_the_core_folder():
    spec = importlib.util.find_spec("wsi_llava")
    assert spec is not None and spec.origin is not None
    assert spec.origin.replace("\\", "/").endswith("core/wsi_llava/__init__.py")


def test_console_script_declared():
    eps = importlib.metadata.entry_points(group="console_scripts")
    assert any(ep.name == "wsi-llava" and ep.value == "wsi_llava.cli:main" for ep in eps)


def test_import_does_not_import_torch_or_gui():
    code = (
        "import sys, wsi_llava, wsi_llava.plugins as p, wsi_llava.cli, wsi_llava.session\n"
        "p.slide_readers(); p.tile_encoders(); p.models()\n"
        "bad = [m for m in ('torch', 'transformers', 'timm', 'napari', 'PyQt6', 'py4j') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"heavy modules imported at import time: {out.stdout}"
