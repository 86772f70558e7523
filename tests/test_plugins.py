"""Plugins: built-ins register through the hooks; a third-party package adds a slide reader and a model
that the CLI then uses (discovered through a real ``wsi_llava`` entry point in a fresh process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from wsi_llava import plugins

PLUGIN_SOURCE = textwrap.dedent(
    '''
    """A third-party wsi-llava plugin: PNG images as one-level slides, and a tiny model."""
    from pathlib import Path

    import numpy as np

    from wsi_llava import hookimpl
    from wsi_llava.errors import SlideError
    from wsi_llava.slide.base import BaseSlideReader


    class PngSlide(BaseSlideReader):
        reader_name = "png-slide"

        def __init__(self, path, mpp=None):
            super().__init__(path, mpp)
            from skimage.io import imread

            try:
                self._img = np.ascontiguousarray(imread(self.path)[..., :3])
            except Exception as e:
                raise SlideError(f"{self.path}: not a PNG image ({e})") from None

        @property
        def level_dimensions(self):
            h, w = self._img.shape[:2]
            return ((w, h),)

        @property
        def level_downsamples(self):
            return (1.0,)

        def _native_mpp(self):
            side = self.path.with_suffix(".mpp")
            return float(side.read_text()) if side.exists() else None

        def _read(self, location, level, size):
            out = np.full((size[1], size[0], 3), 255, np.uint8)
            x, y = location
            h, w = self._img.shape[:2]
            x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + size[0], w), min(y + size[1], h)
            if x1 > x0 and y1 > y0:
                out[y0 - y : y1 - y, x0 - x : x1 - x] = self._img[y0:y1, x0:x1]
            return out


    def load_tiny(device="cpu", dtype=None):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        from wsi_llava.slide_encoder.config import SlideEncoderConfig
        from wsi_llava.slide_encoder.slide_encoder import SlideEncoder
        from wsi_llava.model.llm import load_llm
        from wsi_llava.model.projector import build_projector
        from wsi_llava.model.spec import LLMSpec, ModelSpec, ProjectorSpec, TileEncoderSpec
        from wsi_llava.model.wsi_llava import WSILlava

        _, tok = load_llm("smollm2-135m-instruct")
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.eos_token_id,
                          bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
        llm = LlamaForCausalLM(cfg).eval()
        se_cfg = SlideEncoderConfig.demo(in_dim=192, n_tokens=16)
        spec = ModelSpec(name="tiny-thirdparty", untrained=True, tile_encoder=TileEncoderSpec(name="demo-vit"),
                         slide_encoder=se_cfg.model_dump(mode="json"),
                         projector=ProjectorSpec(in_dim=se_cfg.out_dim, out_dim=64),
                         llm=LLMSpec(source="tiny"), template="chat", n_visual_tokens=16)
        return WSILlava(llm, tok, build_projector("mlp2x_gelu", se_cfg.out_dim, 64), spec,
                        slide_encoder=SlideEncoder(se_cfg).eval())


    @hookimpl
    def register_slide_readers(register):
        register("png-slide", PngSlide, suffixes=(".png",), priority=50, description="PNG image as a slide")


    @hookimpl
    def register_models(register):
        register("tiny-thirdparty", load_tiny, description="a tiny test model from a third-party plugin")
    '''
)


@pytest.fixture
def plugin_path(tmp_path: Path) -> Path:
    """A package installed the way pip would: module + dist-info with a ``wsi_llava`` entry point."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "wsi_llava_thirdparty.py").write_text(PLUGIN_SOURCE)
    dist = site / "wsi_llava_thirdparty-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: wsi-llava-thirdparty\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[wsi_llava]\nthirdparty = wsi_llava_thirdparty\n")
    return site


def test_builtins_registered_through_hooks():
    assert plugins.slide_readers()["openslide"].plugin == "wsi_llava.slide.plugin"
    assert plugins.tile_encoders()["demo-vit"].plugin == "wsi_llava.features.plugin"
    assert plugins.models()["demo"].plugin == "wsi_llava.model.plugin"
    assert "openai" in plugins.judges()


def test_register_and_unregister_at_run_time():
    class Extra:
        @staticmethod
        @plugins.hookspecs.hookimpl
        def register_sinks(register):
            register("collect", lambda answer, context: context.setdefault("seen", []).append(answer))

    plugins.register_plugin(Extra(), name="extra-test")
    try:
        ctx: dict = {}
        plugins.sinks()["collect"].fn("an answer", ctx)
        assert ctx["seen"] == ["an answer"]
    finally:
        plugins.unregister_plugin("extra-test")
    assert "collect" not in plugins.sinks()


def test_third_party_reader_and_model_from_cli(plugin_path: Path, tmp_path: Path, shared_cache: Path):
    from skimage.io import imsave

    rng = np.random.default_rng(0)
    img = np.full((1024, 1024, 3), 240, np.uint8)
    img[256:, 256:] = rng.integers(60, 200, (768, 768, 3), dtype=np.uint8)  # exactly 3 x 3 tiles
    png = tmp_path / "field.png"
    imsave(png, img, check_contrast=False)
    (tmp_path / "field.mpp").write_text("0.5")

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(plugin_path), os.environ.get("PYTHONPATH", "")]),
        "WSI_LLAVA_CACHE": str(shared_cache),
    }
    exe = str(Path(sys.executable).with_name("wsi-llava"))
    out = subprocess.run([exe, "models", "--json"], capture_output=True, text=True, env=env, check=True)
    listed = json.loads(out.stdout)
    assert {"name": "png-slide", "plugin": "thirdparty", "description": "PNG image as a slide"} in listed[
        "slide readers"
    ]
    assert "tiny-thirdparty" in {m["name"] for m in listed["models"]}

    out = subprocess.run(
        [
            exe,
            "ask",
            str(png),
            "Describe this.",
            "--model",
            "tiny-thirdparty",
            "--json",
            "--max-new-tokens",
            "5",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    ans = json.loads(out.stdout)
    assert ans["model"] == "tiny-thirdparty"
    assert 0 < ans["timings"]["new_tokens"] <= 5
    assert len(ans["evidence"]["tile_indices"]) == 9  # 768 px of tissue at 0.5 µm/px = 3 x 3 tiles
    assert ans["evidence"]["coords"][0] == [256, 256]
