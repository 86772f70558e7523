"""Start-up of an answering process: what a ``wsi-llava ask`` about cached features imports and builds."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from kits.cli import run_cli

Q = "What tissue types are present, and what is the diagnosis?"
#: imported only by featurizing (timm) or by transformers' vision code (the other two)
VISION = ("timm", "torchvision", "scipy.optimize")


def _imported(stderr: str) -> set[str]:
    """Module names in ``-X importtime`` output (``import time: self | cumulative | name``)."""
    return {m.group(1) for m in re.finditer(r"^import time:[^|]*\|[^|]*\|\s*(\S+)\s*$", stderr, re.M)}


def test_cli_ask_about_cached_features_imports_no_vision_code(world: Path, tmp_path: Path):
    """The first ``ask`` featurizes (timm, hence torchvision); the second reads the cache and loads the
    LLM without timm, torchvision or scipy.optimize, and answers the same."""
    slide = world / "slides" / "slide_000.tif"
    env = {"PYTHONPROFILEIMPORTTIME": "1"}
    first = run_cli("ask", str(slide), Q, "--max-new-tokens", "6", cache=tmp_path, env=env)
    assert {"timm", "torchvision"} <= _imported(first.stderr)
    second = run_cli("ask", str(slide), Q, "--max-new-tokens", "6", cache=tmp_path, env=env)
    loaded = _imported(second.stderr)
    assert {"wsi_llava.model.llm", "transformers.modeling_utils"} <= loaded  # the LLM loaded in this process
    assert not loaded & set(VISION), sorted(loaded & set(VISION))
    assert second.stdout.strip() and second.stdout == first.stdout


def test_text_only_transformers_hides_vision_backends_from_transformers_only():
    """After the hook, transformers reports torchvision and scipy as missing and still loads a language
    model's config; torchvision itself still imports. With transformers already imported it does nothing."""
    code = "\n".join(
        [
            "from wsi_llava.startup import text_only_transformers",
            "assert text_only_transformers()",
            "import transformers, transformers.utils as tu",
            "from transformers import LlamaConfig, AutoModelForCausalLM",
            "AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=16, intermediate_size=32,"
            " num_hidden_layers=1, num_attention_heads=2, vocab_size=64))",
            "import sys",
            "assert not tu.is_torchvision_available() and not tu.is_scipy_available()",
            "assert 'torchvision' not in sys.modules and 'scipy.optimize' not in sys.modules",
            "import torchvision.transforms",
            "assert not text_only_transformers()",
            "print('ok')",
        ]
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_a_loaded_model_builds_its_tile_encoder_only_to_featurize(world: Path, tmp_path: Path):
    """Loading the demo builds no tile encoder; its cache id is the one the built encoder gives, so the
    features cached before are found; featurizing builds it and frees it once the features are cached."""
    from wsi_llava.model import load_model
    from wsi_llava.model.build import own_tile_encoder
    from wsi_llava.session import SlideSession

    model = load_model("demo")
    assert model.tile_encoder is None and own_tile_encoder(model.spec)
    built = model.build_tile_encoder()
    assert model.tile_encoder_id() == built.encoder_id
    with SlideSession(world / "slides" / "slide_000.tif", model, cache_dir=tmp_path) as s:
        s.extract()
        assert s._tile_encoder is None  # released after featurizing
    with SlideSession(world / "slides" / "slide_000.tif", model, cache_dir=tmp_path) as s:
        s.ask("Is there tumour?", max_new_tokens=3)
        assert s._tile_encoder is None and model.tile_encoder is None  # cached: never built
