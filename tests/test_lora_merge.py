"""Loading a LoRA checkpoint merges the adapter without peft, to the very bits peft's merge gives."""

from __future__ import annotations

import json

import pytest
import torch
from kits.llm import make_tiny_wsi_llava

from wsi_llava.errors import ModelError
from wsi_llava.model.checkpoint import load_checkpoint, load_lora, peft_quietly, save_checkpoint
from wsi_llava.model.llm import is_plain_lora, load_llm, merge_lora_weights


def _trained_lora_checkpoint(llm_dir, folder, **lora):
    """A checkpoint whose adapter holds non-zero B (as a trained one does), saved by peft."""
    from peft import LoraConfig, get_peft_model

    m = make_tiny_wsi_llava(llm_dir)
    with peft_quietly():
        m.llm = get_peft_model(m.llm, LoraConfig(**lora))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in m.llm.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.05)
    return save_checkpoint(m, folder)


def _peft_merged(llm_dir, adapter, dtype):
    llm, _ = load_llm(llm_dir, dtype=dtype)
    return load_lora(llm, adapter).merge_and_unload()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    "lora",
    [
        {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        {"r": 8, "lora_alpha": 4, "use_rslora": True, "target_modules": ["o_proj", "gate_proj"]},
    ],
)
def test_merge_equals_peft_bit_for_bit(tiny_llm_dir, tmp_path, monkeypatch, dtype, lora):
    from wsi_llava.model import checkpoint

    ckpt = _trained_lora_checkpoint(tiny_llm_dir, tmp_path / "ckpt", **lora)
    with monkeypatch.context() as m:  # plain LoRA never builds a peft model
        m.setattr(checkpoint, "load_lora", lambda *a: pytest.fail("peft built a model for plain LoRA"))
        ours = load_checkpoint(ckpt, dtype=dtype).llm
    want = _peft_merged(tiny_llm_dir, ckpt / "lora", dtype).state_dict()
    base, _ = load_llm(tiny_llm_dir, dtype=dtype)
    got = ours.state_dict()
    assert got.keys() == want.keys() and type(ours).__name__ == "LlamaForCausalLM"
    assert all(torch.equal(got[k], want[k]) for k in want)
    changed = [k for k, v in base.state_dict().items() if not torch.equal(v, got[k])]
    assert changed and all(any(t in k for t in lora["target_modules"]) for k in changed)


def test_adapters_beyond_plain_lora_are_left_to_peft(tiny_llm_dir, tmp_path):
    """A DoRA adapter is not a plain sum: the fast merge declines it, and peft's merge is what loads."""
    ckpt = _trained_lora_checkpoint(
        tiny_llm_dir, tmp_path / "dora", r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True
    )
    config = json.loads((ckpt / "lora" / "adapter_config.json").read_text())
    assert not is_plain_lora(config) and is_plain_lora(config | {"use_dora": False})
    llm, _ = load_llm(tiny_llm_dir)
    before = {k: v.clone() for k, v in llm.state_dict().items()}
    assert merge_lora_weights(llm, ckpt / "lora") is False
    assert all(torch.equal(before[k], v) for k, v in llm.state_dict().items())
    got = load_checkpoint(ckpt).llm.state_dict()
    want = _peft_merged(tiny_llm_dir, ckpt / "lora", "float32").state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_an_adapter_for_another_model_names_its_folder(tiny_llm_dir, tmp_path):
    ckpt = _trained_lora_checkpoint(
        tiny_llm_dir, tmp_path / "ckpt", r=4, lora_alpha=8, target_modules=["q_proj"]
    )
    from safetensors.torch import load_file, save_file

    path = ckpt / "lora" / "adapter_model.safetensors"
    state = load_file(str(path))
    save_file({k.replace("q_proj", "no_such_proj"): v for k, v in state.items()}, str(path))
    with pytest.raises(ModelError, match=r"ckpt/lora: cannot load the LoRA adapter.*no_such_proj"):
        load_checkpoint(ckpt)


def test_the_merge_runs_where_the_weights_live(tiny_llm_dir, tmp_path):
    """A model loaded onto an accelerator merges there: the adapter's CPU tensors follow each weight (the
    meta device stands in for CUDA, which mixes with CPU tensors no more than meta does)."""
    from wsi_llava.model.llava_import import merge_lora

    ckpt = _trained_lora_checkpoint(
        tiny_llm_dir, tmp_path / "ckpt", r=4, lora_alpha=8, target_modules=["q_proj"]
    )
    llm, _ = load_llm(tiny_llm_dir)
    state = {k: v.to("meta") for k, v in llm.state_dict().items()}
    assert merge_lora(state, ckpt / "lora") == llm.config.num_hidden_layers
    merged = [k for k in state if "q_proj" in k]
    assert merged and all(state[k].device.type == "meta" for k in state)
    assert all(state[k].shape == llm.state_dict()[k].shape for k in merged)
