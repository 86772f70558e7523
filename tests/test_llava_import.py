"""Import of official LLaVA-format WSI-LLaVA checkpoints, checked against a plain-torch computation.

Tiny checkpoints are written in exactly the upstream key layout (``kits.llava``): merged
(``pytorch_model-*.bin`` or ``model-*.safetensors`` shards with an index) and LoRA (peft adapter +
``non_lora_trainables.bin`` on a merged base); the other layouts are in ``test_llava_layouts.py``. Logits for a prompt with ``<image>`` + random 576x1024 features must match a direct
computation: a ``LlamaForCausalLM`` built from the raw state dict, a manual LoRA merge, the projector as
matmuls and a manual splice.
"""

from __future__ import annotations

import json

import pytest
import torch
from kits.llava import (
    MM_HIDDEN,
    N_VIS,
    Q,
    full_state,
    half_round,
    llava_config,
    lora_tensors,
    make_world,
    merged_with_lora,
    our_logits,
    reference_logits,
    write_lora,
    write_merged,
)

from wsi_llava.errors import ModelError
from wsi_llava.model import load_model


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("llava"))


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_merged_checkpoint_matches_plain_torch(world, fmt):
    folder = write_merged(world, world["root"] / f"merged-{fmt}", fmt)
    model = load_model(folder)
    assert model.spec.template == "llava_v1" and model.spec.projector.in_dim == MM_HIDDEN
    assert model.spec.n_visual_tokens == N_VIS
    assert type(model.llm).__name__ == "LlamaForCausalLM"
    want = reference_logits(world, half_round(world["llm"]), half_round(world["proj"]))
    torch.testing.assert_close(our_logits(model, world), want, rtol=1e-4, atol=1e-4)
    text = model.generate_text(Q, world["vis"], max_new_tokens=4)
    assert isinstance(text, str) and model.last_generation.prompt_len == want.shape[1]


def test_convert_to_our_format(world, tmp_path):
    """Our checkpoint either names the LLaVA folder (format "llava") or carries the LLM in llm/."""
    from wsi_llava.model.checkpoint import save_checkpoint

    source = write_merged(world, tmp_path / "merged", "safetensors")
    model = load_model(source)
    assert model.spec.llm.source == str(source) and model.spec.llm.format == "llava"
    assert model.spec.llm.base is None
    for name, save_llm in (("ours-ref", False), ("ours-llm", True)):
        folder = save_checkpoint(model, tmp_path / name, save_llm=save_llm)
        assert (folder / "wsi_llava.json").is_file()
        assert (folder / "llm" / "config.json").is_file() == save_llm
        again = load_model(folder)
        assert again.spec.template == "llava_v1"
        assert again.spec.llm.format == ("hf" if save_llm else "llava")
        torch.testing.assert_close(our_logits(again, world), our_logits(model, world), rtol=0, atol=0)


def test_single_safetensors_file_and_float32(world, tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "single"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(llava_config(len(world["tok"]))))
    world["tok"].save_pretrained(folder)
    save_file(
        {k: v.contiguous() for k, v in full_state(world, dtype=torch.float32).items()},
        str(folder / "model.safetensors"),
    )
    model = load_model(folder)
    want = reference_logits(world, world["llm"], world["proj"])
    torch.testing.assert_close(our_logits(model, world), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("adapter_fmt", ["bin", "safetensors"])
def test_lora_checkpoint_matches_manual_merge(world, adapter_fmt):
    base = (
        write_merged(world, world["root"] / "base-for-lora", "bin")
        if not (world["root"] / "base-for-lora").exists()
        else world["root"] / "base-for-lora"
    )
    folder = write_lora(world, world["root"] / f"lora-{adapter_fmt}", adapter_fmt, r=8, alpha=16)
    model = load_model(folder, model_base=base)
    assert model.spec.llm.format == "llava" and model.spec.llm.base == str(base)
    merged = merged_with_lora(world, r=8, alpha=16)
    non_lora = torch.load(folder / "non_lora_trainables.bin")
    proj = {k.removeprefix("base_model.model.model.mm_projector."): v for k, v in non_lora.items()}
    want = reference_logits(world, merged, proj)
    got = our_logits(model, world)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # not the base model's logits: the adapter and the new projector are in effect
    base_logits = reference_logits(world, half_round(world["llm"]), half_round(world["proj"]))
    assert not torch.allclose(got, base_logits, atol=1e-3)


def test_lora_layout_is_what_peft_reads(world):
    """peft itself merges our test adapter the same way (the layout is the real one)."""
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = write_lora(world, world["root"] / "lora-peft", "safetensors", r=4, alpha=16)
    cfg = LlamaConfig(**{k: v for k, v in llava_config(len(world["tok"])).items() if not k.startswith("mm_")})
    base = LlamaForCausalLM(cfg).eval()
    base.load_state_dict(half_round(world["llm"]), strict=True)
    merged = PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
    ours = half_round(world["llm"])
    for module, (a, b) in lora_tensors(world, 4).items():
        ours[module + ".weight"] = ours[module + ".weight"] + (16 / 4) * (b.half().float() @ a.half().float())
    for k, v in merged.state_dict().items():
        if k in ours:
            torch.testing.assert_close(v, ours[k], rtol=1e-5, atol=1e-5)


def test_missing_projector_keys(world, tmp_path):
    sd = full_state(world)
    del sd["model.mm_projector.2.weight"], sd["model.mm_projector.0.bias"]
    folder = write_merged(world, tmp_path / "noproj", "bin", sd=sd)
    with pytest.raises(
        ModelError, match=r"pytorch_model-0000.*model\.mm_projector\.0\.bias.*model\.mm_projector\.2\.weight"
    ):
        load_model(folder)


def test_lora_errors(world, tmp_path):
    base = write_merged(world, tmp_path / "base", "safetensors")
    folder = write_lora(world, tmp_path / "lora", "bin")
    with pytest.raises(ModelError, match=r"lora: a LoRA checkpoint needs its base LLM.*llava-v1\.5-7b"):
        load_model(folder)
    (folder / "non_lora_trainables.bin").unlink()
    with pytest.raises(ModelError, match="LoRA checkpoint without non_lora_trainables.bin"):
        load_model(folder, model_base=base)
    bad = write_lora(
        world,
        tmp_path / "lora2",
        "bin",
        non_lora={"base_model.model.model.embed_tokens.weight": torch.zeros(1)},
    )
    with pytest.raises(
        ModelError,
        match=r"non_lora_trainables\.bin: tensors whose shape differs from the base: "
        r"model\.embed_tokens\.weight \(1,\)",
    ):
        load_model(bad, model_base=base)
    part = write_lora(
        world,
        tmp_path / "lora3",
        "bin",
        non_lora={"base_model.model.model.mm_projector.0.weight": torch.zeros(64, MM_HIDDEN)},
    )
    with pytest.raises(
        ModelError,
        match=r"non_lora_trainables\.bin: projector weights do not fit .*missing model\.mm_projector\.0\.bias",
    ):
        load_model(part, model_base=base)


def test_broken_index_and_no_weights(world, tmp_path):
    folder = write_merged(world, tmp_path / "m", "safetensors")
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelError, match="missing: model-00002-of-00002.safetensors"):
        load_model(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(llava_config(10)))
    with pytest.raises(ModelError, match="no weights found"):
        load_model(empty)
