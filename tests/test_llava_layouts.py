"""LoRA and projector-only LLaVA checkpoints over a plain Vicuna or a merged LLaVA base, and the base LLM alone.

Each layout is written as upstream LLaVA writes it (``kits.llava``); logits for a prompt with
``<image>`` + random 576x1024 features must match a plain-torch reference; ``inspect_llava`` must report
what ``read_llava`` builds.
"""

from __future__ import annotations

import pytest
import torch
from kits.llava import (
    HIDDEN,
    MM_HIDDEN,
    half_round,
    lora_projector,
    make_world,
    merged_with_lora,
    our_logits,
    random_projector,
    reference_llama,
    reference_logits,
    write_lora,
    write_merged,
    write_projector_only,
    write_vicuna,
)

from wsi_llava.model import llava_import
from wsi_llava.model.llava_import import inspect_llava, load_base_llm, read_llava


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = make_world(tmp_path_factory.mktemp("llava-layouts"))
    g = torch.Generator().manual_seed(41)
    # the Vicuna base has its own weights, so "base = Vicuna" and "base = merged LLaVA" differ
    w["vicuna"] = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in w["llm"].items()}
    w["stage2"] = random_projector(g)
    root = w["root"]
    w["dirs"] = {
        "merged": write_merged(w, root / "llava-v1.5-7b", "bin"),
        "vicuna-bin": write_vicuna(w, root / "vicuna-bin", "bin", llm=w["vicuna"]),
        "vicuna-hf": write_vicuna(w, root / "vicuna-hf", "save_pretrained", llm=w["vicuna"]),
        "lora": write_lora(w, root / "lora", "safetensors", r=8, alpha=16, base_name="./vicuna-7b-v1.5"),
        "projector": write_projector_only(w, root / "pretrain", w["stage2"]),
    }
    return w


def model_of(world, folder, base=None):
    return llava_import.load_llava(folder, model_base=base, device="cpu", dtype="float32")


@pytest.mark.parametrize("base_name", ["vicuna-bin", "vicuna-hf"])
def test_lora_over_plain_vicuna(world, base_name):
    """WSI-LLaVA's stage 3 trained from Vicuna: the projector comes from non_lora_trainables.bin."""
    base = world["dirs"][base_name]
    model = model_of(world, world["dirs"]["lora"], base)
    want = reference_logits(
        world, merged_with_lora(world, 8, 16, base_llm=world["vicuna"]), half_round(lora_projector(world))
    )
    torch.testing.assert_close(our_logits(model, world), want, rtol=1e-4, atol=1e-4)
    assert model.spec.llm.format == "llava" and model.spec.llm.base == str(base)


def test_lora_over_merged_uses_its_own_projector_not_the_bases(world):
    model = model_of(world, world["dirs"]["lora"], world["dirs"]["merged"])
    want = reference_logits(world, merged_with_lora(world, 8, 16), half_round(lora_projector(world)))
    torch.testing.assert_close(our_logits(model, world), want, rtol=1e-4, atol=1e-4)


def test_lora_without_projector_keeps_the_merged_bases(world, tmp_path):
    """As LLaVA's builder (load_state_dict strict=False): a non_lora_trainables.bin without projector keys
    leaves the base's projector in place; over a plain Vicuna there is none to keep."""
    folder = write_lora(world, tmp_path / "lora-noproj", "bin", non_lora={})
    model = model_of(world, folder, world["dirs"]["merged"])
    want = reference_logits(world, merged_with_lora(world, 8, 16), half_round(world["proj"]))
    torch.testing.assert_close(our_logits(model, world), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(llava_import.ModelError, match=r"non_lora_trainables\.bin: no projector weights"):
        inspect_llava(folder, world["dirs"]["vicuna-bin"])


@pytest.mark.parametrize("base_name", ["vicuna-bin", "merged"])
def test_projector_only_over_a_base(world, base_name):
    """Stage-2 output (mm_projector.bin) over Vicuna, or replacing a merged LLaVA's projector."""
    base = world["dirs"][base_name]
    model = model_of(world, world["dirs"]["projector"], base)
    llm = world["vicuna"] if base_name == "vicuna-bin" else world["llm"]
    want = reference_logits(world, half_round(llm), half_round(world["stage2"]))
    got = our_logits(model, world)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    if base_name == "merged":  # the merged folder's own projector is not what runs
        theirs = reference_logits(world, half_round(llm), half_round(world["proj"]))
        assert not torch.allclose(got, theirs, atol=1e-3)


def test_projector_only_without_config_infers_from_the_weights(world, tmp_path):
    folder = write_projector_only(world, tmp_path / "pretrain-noconfig", world["stage2"])
    (folder / "config.json").unlink()
    info = inspect_llava(folder, world["dirs"]["vicuna-bin"])
    assert (info.projector_type, info.projector_in, info.mm_hidden_size) == (
        "mlp2x_gelu",
        MM_HIDDEN,
        MM_HIDDEN,
    )
    model = model_of(world, folder, world["dirs"]["vicuna-bin"])
    want = reference_logits(world, half_round(world["vicuna"]), half_round(world["stage2"]))
    torch.testing.assert_close(our_logits(model, world), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "folder,base,kind",
    [
        ("merged", None, "merged"),
        ("lora", "vicuna-bin", "lora"),
        ("lora", "merged", "lora"),
        ("projector", "vicuna-hf", "projector"),
    ],
)
def test_inspect_agrees_with_read(world, folder, base, kind):
    d = world["dirs"]
    info = inspect_llava(d[folder], d[base] if base else None)
    parts = read_llava(d[folder], d[base] if base else None, dtype="float32")
    assert info.kind == parts.kind == kind
    assert info.folder == parts.folder and info.base == parts.base
    assert (info.hidden_size, info.projector_out) == (parts.hidden, parts.hidden) == (HIDDEN, HIDDEN)
    assert info.projector_in == info.mm_hidden_size == parts.in_dim == MM_HIDDEN
    assert info.projector_type == parts.projector_type == "mlp2x_gelu"
    assert info.num_hidden_layers == parts.llm.config.num_hidden_layers
    assert info.vocab_size == parts.llm.config.vocab_size == len(world["tok"])
    n = sum(p.numel() for p in parts.llm.parameters()) + sum(p.numel() for p in parts.projector.parameters())
    assert info.n_params == n
    assert all(f.is_file() for f in info.weight_files)
    shards = llava_import.weight_files(d[base] if base else d[folder])
    extra = {"merged": [], "lora": ["non_lora_trainables.bin", "adapter_model.safetensors"]}
    extra["projector"] = ["mm_projector.bin"]
    assert info.weight_files == [*shards, *(d[folder] / n for n in extra[kind])]
    assert info.tokenizer_folder == (d[folder] if folder == "merged" else d[base])  # LoRA/stage-2 ship none
    assert parts.projector[0].weight.dtype == torch.float32
    assert type(parts.llm).__name__ == "LlamaForCausalLM"


def test_read_llava_dtype_and_config(world):
    parts = read_llava(world["dirs"]["lora"], world["dirs"]["merged"], dtype="bfloat16")
    assert parts.llm.model.embed_tokens.weight.dtype == torch.bfloat16
    assert next(parts.projector.parameters()).dtype == torch.bfloat16
    assert parts.config["mm_projector_type"] == "mlp2x_gelu" and parts.config["model_type"] == "llava_llama"


@pytest.mark.parametrize("name", ["merged", "vicuna-bin", "vicuna-hf"])
def test_load_base_llm(world, name):
    """The LLM of a merged LLaVA folder (projector and vision tower dropped) or of a plain HF folder."""
    llm, tok = load_base_llm(world["dirs"][name], dtype="float32")
    raw = world["llm"] if name == "merged" else world["vicuna"]
    ref = reference_llama(len(world["tok"]), half_round(raw))
    ids = torch.tensor([tok("The tissue is invasive carcinoma.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(llm(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
    assert not any("mm_projector" in k or "vision_tower" in k for k in llm.state_dict())


def test_load_base_llm_refuses_folders_without_a_full_llm(world):
    for name in ("lora", "projector"):
        with pytest.raises(llava_import.ModelError, match="holds no full LLM"):
            load_base_llm(world["dirs"][name])


def test_detection(world):
    d = world["dirs"]
    assert [llava_import.llava_kind(d[n]) for n in ("merged", "lora", "projector")] == [
        "merged",
        "lora",
        "projector",
    ]
    assert llava_import.is_projector_checkpoint(d["projector"])
    assert not llava_import.is_projector_checkpoint(d["lora"])
    assert llava_import.is_lora_checkpoint(d["lora"]) and not llava_import.is_lora_checkpoint(d["merged"])
    assert all(llava_import.is_llava_checkpoint(d[n]) for n in ("merged", "lora", "projector"))
    assert not any(llava_import.is_llava_checkpoint(d[n]) for n in ("vicuna-bin", "vicuna-hf"))
