"""Import of official LLaVA-format WSI-LLaVA checkpoints, checked against a plain-torch computation.

Tiny checkpoints are written in exactly the upstream key layout: merged (``pytorch_model-*.bin`` with an
index, or ``model-*.safetensors`` shards with an index) and LoRA (peft adapter + ``non_lora_trainables.bin``
on a merged base). Logits for a prompt with ``<image>`` + random 576x1024 features must match a direct
computation: a ``LlamaForCausalLM`` built from the raw state dict, a manual LoRA merge, the projector as
matmuls and a manual splice.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_model_kit import make_tiny_llama, make_tiny_tokenizer

from wsi_llava.errors import ModelError
from wsi_llava.model import load_model
from wsi_llava.model.templates import IMAGE_TOKEN_INDEX, build_prompt

HIDDEN, MM_HIDDEN, N_VIS = 64, 1024, 576
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
Q = "What is the diagnosis?"


def llava_config(vocab: int) -> dict:
    """A llava-v1.5-style config.json (transformers 4.31 era), tiny sizes."""
    return {
        "_name_or_path": "./checkpoints/vicuna-7b-v1.5",
        "architectures": ["LlavaLlamaForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "freeze_mm_mlp_adapter": False,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "image_aspect_ratio": "pad",
        "initializer_range": 0.02,
        "intermediate_size": 2 * HIDDEN,
        "max_position_embeddings": 4096,
        "mm_hidden_size": MM_HIDDEN,
        "mm_patch_merge_type": "flat",
        "mm_projector_lr": 2e-5,
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": "./LLaVA-main/clip-vit-large-patch14-336",
        "model_type": "llava_llama",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "pad_token_id": 0,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",
        "torch_dtype": "float16",
        "transformers_version": "4.37.2",
        "tune_mm_mlp_adapter": False,
        "use_cache": True,
        "use_mm_proj": True,
        "vocab_size": vocab,
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Raw tensors: tiny Llama weights (every tensor perturbed, so each one matters) and a projector."""
    tok = make_tiny_tokenizer()
    g = torch.Generator().manual_seed(11)
    llm = {
        k: v + 0.02 * torch.randn(v.shape, generator=g)
        for k, v in make_tiny_llama(tok, seed=5).state_dict().items()
    }
    proj = {
        "0.weight": torch.randn(HIDDEN, MM_HIDDEN, generator=g) * 0.03,
        "0.bias": torch.randn(HIDDEN, generator=g) * 0.1,
        "2.weight": torch.randn(HIDDEN, HIDDEN, generator=g) * 0.1,
        "2.bias": torch.randn(HIDDEN, generator=g) * 0.1,
    }
    vis = torch.randn(N_VIS, MM_HIDDEN, generator=g)
    return {"tok": tok, "llm": llm, "proj": proj, "vis": vis, "root": tmp_path_factory.mktemp("llava")}


def full_state(world, llm=None, proj=None, dtype=torch.float16) -> dict:
    """The merged LlavaLlamaForCausalLM state dict, vision tower included (it must be ignored)."""
    sd = {k: v.to(dtype) for k, v in (llm or world["llm"]).items()}
    sd.update({f"model.mm_projector.{k}": v.to(dtype) for k, v in (proj or world["proj"]).items()})
    sd["model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight"] = torch.zeros(
        8, 3, 14, 14
    )
    return sd


def write_merged(world, folder: Path, fmt: str, sd: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    sd = full_state(world) if sd is None else sd
    (folder / "config.json").write_text(json.dumps(llava_config(len(world["tok"]))))
    world["tok"].save_pretrained(folder)
    keys = sorted(sd)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    if fmt == "bin":
        names = [f"pytorch_model-0000{i + 1}-of-00002.bin" for i in range(2)]
        for name, ks in zip(names, halves, strict=True):
            torch.save({k: sd[k] for k in ks}, folder / name)
        index = "pytorch_model.bin.index.json"
    else:
        from safetensors.torch import save_file

        names = [f"model-0000{i + 1}-of-00002.safetensors" for i in range(2)]
        for name, ks in zip(names, halves, strict=True):
            save_file({k: sd[k].contiguous() for k in ks}, str(folder / name))
        index = "model.safetensors.index.json"
    weight_map = {k: name for name, ks in zip(names, halves, strict=True) for k in ks}
    (folder / index).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return folder


def lora_tensors(world, r: int = 8):
    g = torch.Generator().manual_seed(23)
    out = {}
    for name, w in world["llm"].items():
        if name.startswith("model.layers.") and name.endswith(".weight") and name.split(".")[-2] in TARGETS:
            module = name[: -len(".weight")]
            out[module] = (
                torch.randn(r, w.shape[1], generator=g) * 0.1,
                torch.randn(w.shape[0], r, generator=g) * 0.1,
            )
    return out


def write_lora(
    world, folder: Path, adapter_fmt: str, r: int = 8, alpha: int = 16, non_lora: dict | None = None
):
    """LLaVA's LoRA output dir: config.json, adapter_config.json, adapter_model.*, non_lora_trainables.bin."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(llava_config(len(world["tok"]))))
    (folder / "adapter_config.json").write_text(
        json.dumps(
            {
                "base_model_name_or_path": "./LLaVA-main/llava-v1.5-7b/",
                "bias": "none",
                "fan_in_fan_out": False,
                "inference_mode": True,
                "init_lora_weights": True,
                "lora_alpha": alpha,
                "lora_dropout": 0.05,
                "modules_to_save": None,
                "peft_type": "LORA",
                "r": r,
                "target_modules": list(TARGETS),
                "task_type": "CAUSAL_LM",
            }
        )
    )
    adapter = {}
    for module, (a, b) in lora_tensors(world, r).items():
        adapter[f"base_model.model.{module}.lora_A.weight"] = a.half()
        adapter[f"base_model.model.{module}.lora_B.weight"] = b.half()
    if adapter_fmt == "bin":
        torch.save(adapter, folder / "adapter_model.bin")
    else:
        from safetensors.torch import save_file

        save_file(adapter, str(folder / "adapter_model.safetensors"))
    if non_lora is None:
        g = torch.Generator().manual_seed(31)
        non_lora = {
            f"base_model.model.model.mm_projector.{k}": (v + 0.05 * torch.randn(v.shape, generator=g)).half()
            for k, v in world["proj"].items()
        }
    torch.save(non_lora, folder / "non_lora_trainables.bin")
    return folder


def reference_logits(world, llm_sd: dict, proj: dict, template: str = "llava_v1") -> torch.Tensor:
    """Plain torch: Llama from the raw state dict, projector as matmuls, splice by hand."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(world["tok"]),
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    ref = LlamaForCausalLM(cfg).eval()
    ref.load_state_dict({k: v.float() for k, v in llm_sd.items()}, strict=True)
    p = {k: v.float() for k, v in proj.items()}
    h = F.gelu(world["vis"] @ p["0.weight"].T + p["0.bias"]) @ p["2.weight"].T + p["2.bias"]
    ids = build_prompt(template, world["tok"], Q).input_ids
    pos = ids.index(IMAGE_TOKEN_INDEX)
    emb = ref.model.embed_tokens.weight
    x = torch.cat([emb[ids[:pos]], h, emb[ids[pos + 1 :]]])
    with torch.no_grad():
        return ref(inputs_embeds=x[None]).logits


def our_logits(model, world) -> torch.Tensor:
    ids = torch.tensor([model.prompt(Q).input_ids])
    with torch.no_grad():
        return model(ids, world["vis"][None]).logits


def half_round(sd: dict) -> dict:
    return {k: v.half().float() for k, v in sd.items()}


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
    from wsi_llava.model.checkpoint import save_checkpoint

    model = load_model(write_merged(world, tmp_path / "merged", "safetensors"))
    with pytest.raises(ModelError, match="save_llm=True"):
        save_checkpoint(model, tmp_path / "ours")
    folder = save_checkpoint(model, tmp_path / "ours", save_llm=True)
    assert (folder / "wsi_llava.json").is_file() and (folder / "llm" / "config.json").is_file()
    again = load_model(folder)
    assert again.spec.template == "llava_v1"
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
    # manual merge: W + (alpha / r) * B @ A
    merged = half_round(world["llm"])
    for module, (a, b) in lora_tensors(world, 8).items():
        merged[module + ".weight"] = merged[module + ".weight"] + (16 / 8) * (
            b.half().float() @ a.half().float()
        )
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
    with pytest.raises(ModelError, match="model_base"):
        load_model(folder)
    (folder / "non_lora_trainables.bin").unlink()
    with pytest.raises(ModelError, match="non_lora_trainables.bin"):
        load_model(folder, model_base=base)
    bad = write_lora(
        world,
        tmp_path / "lora2",
        "bin",
        non_lora={"base_model.model.model.embed_tokens.weight": torch.zeros(1)},
    )
    with pytest.raises(
        ModelError,
        match=r"non_lora_trainables\.bin: missing projector weights model\.mm_projector\.0\.weight",
    ):
        load_model(bad, model_base=base)


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
