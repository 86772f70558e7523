"""Tiny LLaVA-1.5 checkpoints in the exact upstream layouts, and the plain-torch reference they must match.

Layouts, as LLaVA's ``train.py`` writes them:

* merged: ``config.json`` (``LlavaLlamaForCausalLM``) + ``pytorch_model-*.bin`` or ``model-*.safetensors``
  shards with an index, Llama keys + ``model.mm_projector.*`` (+ vision tower keys, to be ignored);
* LoRA: ``config.json``, ``adapter_config.json``, ``adapter_model.*``, ``non_lora_trainables.bin``
  (``base_model.model.model.mm_projector.*``, from ``get_peft_state_non_lora_maybe_zero_3``);
* projector only: ``config.json``, ``mm_projector.bin`` (``model.mm_projector.*``, from
  ``get_mm_adapter_state_maybe_zero_3``), ``trainer_state.json``;
* a SentencePiece-only tokenizer folder (``tokenizer.model`` + configs, no ``tokenizer.json``) as
  llava-v1.5-7b ships it, the SentencePiece model trained here as Llama's was (by the writer of
  ``benchmarks/make_paper_weights.py``, which writes the full-size one);
* plain Vicuna: ``config.json`` (``LlamaForCausalLM``, as vicuna-7b-v1.5 ships it) + ``.bin`` shards with an
  index, or what ``save_pretrained`` writes today.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from kits import benchmark_module
from kits.llm import CORPUS, make_tiny_llama, make_tiny_tokenizer
from wsi_llava.model.templates import IMAGE_TOKEN_INDEX, build_prompt

HIDDEN, MM_HIDDEN, N_VIS = 64, 1024, 576
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
Q = "What is the diagnosis?"


def vicuna_config(vocab: int, hidden: int = HIDDEN, layers: int = 2, heads: int = 4, kv: int = 2) -> dict:
    """vicuna-7b-v1.5's config.json (transformers 4.31), with the given sizes."""
    return {
        "_name_or_path": "vicuna-7b-v1.5",
        "architectures": ["LlamaForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": 2 * hidden if hidden == HIDDEN else 11008,
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv,
        "pad_token_id": 0,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "transformers_version": "4.31.0",
        "use_cache": True,
        "vocab_size": vocab,
    }


def llava_config(vocab: int, hidden: int = HIDDEN, mm_hidden: int = MM_HIDDEN, **sizes) -> dict:
    """A llava-v1.5-style config.json (LlavaLlamaForCausalLM over the Vicuna config)."""
    cfg = vicuna_config(vocab, hidden, **sizes)
    cfg.update(
        benchmark_module("make_paper_weights").LLAVA_KEYS,
        _name_or_path="./checkpoints/vicuna-7b-v1.5",
        mm_hidden_size=mm_hidden,
    )
    return cfg


def make_world(root: Path) -> dict:
    """Raw tensors: tiny Llama weights (every tensor perturbed, so each one matters) and a projector."""
    tok = make_tiny_tokenizer()
    g = torch.Generator().manual_seed(11)
    llm = {
        k: v + 0.02 * torch.randn(v.shape, generator=g)
        for k, v in make_tiny_llama(tok, seed=5).state_dict().items()
    }
    return {
        "tok": tok,
        "llm": llm,
        "proj": random_projector(g),
        "vis": torch.randn(N_VIS, MM_HIDDEN, generator=g),
        "root": root,
    }


def random_projector(g: torch.Generator, out: int = HIDDEN, mm: int = MM_HIDDEN) -> dict:
    return {
        "0.weight": torch.randn(out, mm, generator=g) * 0.03,
        "0.bias": torch.randn(out, generator=g) * 0.1,
        "2.weight": torch.randn(out, out, generator=g) * 0.1,
        "2.bias": torch.randn(out, generator=g) * 0.1,
    }


def full_state(world, llm=None, proj=None, dtype=torch.float16) -> dict:
    """The merged LlavaLlamaForCausalLM state dict, vision tower included (it must be ignored)."""
    sd = {k: v.to(dtype) for k, v in (llm or world["llm"]).items()}
    sd.update({f"model.mm_projector.{k}": v.to(dtype) for k, v in (proj or world["proj"]).items()})
    sd["model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight"] = torch.zeros(
        8, 3, 14, 14
    )
    return sd


def write_shards(folder: Path, sd: dict, fmt: str) -> list[str]:
    """Two shards + index, named as transformers 4.x names them."""
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
            save_file({k: sd[k].contiguous() for k in ks}, str(folder / name), metadata={"format": "pt"})
        index = "model.safetensors.index.json"
    weight_map = {k: name for name, ks in zip(names, halves, strict=True) for k in ks}
    (folder / index).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return names


def write_merged(world, folder: Path, fmt: str, sd: dict | None = None, tokenizer: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    sd = full_state(world) if sd is None else sd
    (folder / "config.json").write_text(json.dumps(llava_config(len(world["tok"]))))
    if tokenizer:
        world["tok"].save_pretrained(folder)
    write_shards(folder, sd, fmt)
    return folder


def write_vicuna(world, folder: Path, fmt: str = "bin", llm: dict | None = None) -> Path:
    """A plain Vicuna folder: ``bin`` as vicuna-7b-v1.5 ships it, ``save_pretrained`` as transformers writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    llm = world["llm"] if llm is None else llm
    if fmt == "save_pretrained":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            **{k: v for k, v in vicuna_config(len(world["tok"])).items() if k != "architectures"}
        )
        model = LlamaForCausalLM(cfg)
        model.load_state_dict({k: v.half().float() for k, v in llm.items()}, strict=True)
        model.half().save_pretrained(folder, max_shard_size="200KB")
    else:
        (folder / "config.json").write_text(json.dumps(vicuna_config(len(world["tok"]))))
        write_shards(folder, {k: v.half() for k, v in llm.items()}, fmt)
    world["tok"].save_pretrained(folder)
    return folder


def lora_tensors(world, r: int = 8, seed: int = 23):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in world["llm"].items():
        if name.startswith("model.layers.") and name.endswith(".weight") and name.split(".")[-2] in TARGETS:
            module = name[: -len(".weight")]
            out[module] = (
                torch.randn(r, w.shape[1], generator=g) * 0.1,
                torch.randn(w.shape[0], r, generator=g) * 0.1,
            )
    return out


def lora_projector(world, seed: int = 31) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: (v + 0.05 * torch.randn(v.shape, generator=g)).half() for k, v in world["proj"].items()}


def write_lora(
    world,
    folder: Path,
    adapter_fmt: str,
    r: int = 8,
    alpha: int = 16,
    non_lora: dict | None = None,
    base_name: str = "./LLaVA-main/llava-v1.5-7b/",
) -> Path:
    """LLaVA's LoRA output dir: config.json, adapter_config.json, adapter_model.*, non_lora_trainables.bin."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(llava_config(len(world["tok"]))))
    (folder / "adapter_config.json").write_text(
        json.dumps(
            {
                "base_model_name_or_path": base_name,
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
        non_lora = {f"base_model.model.model.mm_projector.{k}": v for k, v in lora_projector(world).items()}
    torch.save(non_lora, folder / "non_lora_trainables.bin")
    return folder


def write_projector_only(world, folder: Path, proj: dict, config: dict | None = None) -> Path:
    """LLaVA's pretrain output dir: config.json, mm_projector.bin, trainer_state.json."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = llava_config(len(world["tok"])) if config is None else config
    cfg["tune_mm_mlp_adapter"] = True
    (folder / "config.json").write_text(json.dumps(cfg))
    torch.save({f"model.mm_projector.{k}": v.half() for k, v in proj.items()}, folder / "mm_projector.bin")
    (folder / "trainer_state.json").write_text(
        json.dumps({"epoch": 1.0, "global_step": 2, "log_history": [{"loss": 2.0, "step": 1}]})
    )
    return folder


def merged_with_lora(world, r: int = 8, alpha: int = 16, base_llm: dict | None = None) -> dict:
    """The manual merge: W + (alpha / r) * B @ A on the fp16-rounded base weights."""
    merged = half_round(world["llm"] if base_llm is None else base_llm)
    for module, (a, b) in lora_tensors(world, r).items():
        merged[module + ".weight"] = merged[module + ".weight"] + (alpha / r) * (
            b.half().float() @ a.half().float()
        )
    return merged


def reference_llama(vocab: int, state: dict, **config):
    """Plain transformers: the Vicuna-shaped tiny ``LlamaForCausalLM`` holding ``state`` (strictly), in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        **config,
    )
    ref = LlamaForCausalLM(cfg).eval()
    ref.load_state_dict(state, strict=True)
    return ref


def reference_logits(world, llm_sd: dict, proj: dict, template: str = "llava_v1") -> torch.Tensor:
    """Plain torch: Llama from the raw state dict, projector as matmuls, splice by hand."""
    ref = reference_llama(
        len(world["tok"]), {k: v.float() for k, v in llm_sd.items()}, max_position_embeddings=4096
    )
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


def write_sentencepiece_folder(folder: Path) -> Path:
    """tokenizer.model + tokenizer_config.json + special_tokens_map.json with llava-v1.5-7b's settings."""
    benchmark_module("make_paper_weights").write_llava_tokenizer(
        folder, CORPUS * 20, 420, hard_vocab_limit=False
    )
    return folder
