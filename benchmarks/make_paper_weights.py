"""Random weights in exactly the official layouts of the paper model's parts, full size by default.

    python benchmarks/make_paper_weights.py OUT [--tiny] [--device auto|cuda|cpu] [--parts gigapath,merged,lora]

Writes, under ``OUT``:

* ``prov-gigapath/``: the Prov-GigaPath timm hub folder. ``config.json`` with the public hub fields
  (``vit_giant_patch14_dinov2``, patch 16, 1536-d, 40 blocks), ``pytorch_model.bin`` (timm's own state
  dict of that architecture, 1.13 B parameters, fp32, ``torch.save``) and ``slide_encoder.pth`` as
  Prov-GigaPath releases it: ``{"model": state_dict}`` of the LongNet slide encoder (12 layers x 768,
  input 1536), in the key layout of :class:`~wsi_llava.slide_encoder.longnet.LongNetViT`;
* ``wsi-llava-v1.5-7b/``: a merged LLaVA-1.5 folder as ``wsi-llava-v1.5-7b-e1`` ships: ``config.json``
  (``LlavaLlamaForCausalLM`` keys, Vicuna-7B sizes, ``mm_projector_type mlp2x_gelu``,
  ``mm_hidden_size 1024``), ``model-0000i-of-0000N.safetensors`` shards of at most 5 GB (the size
  ``save_pretrained`` cuts at) + ``model.safetensors.index.json`` (Llama keys +
  ``model.mm_projector.{0,2}.{weight,bias}``, fp16), ``generation_config.json``, and a SentencePiece-only
  tokenizer as llava-v1.5-7b ships it (``tokenizer.model``, ``tokenizer_config.json`` naming
  ``LlamaTokenizer``, ``special_tokens_map.json``);
* ``wsi-llava-v1.5-7b-lora/``: the LoRA form upstream LLaVA's ``finetune_lora.sh`` writes, meant to be used
  with the merged folder as its base (``--llava-base``; no second 7B copy is written):
  ``adapter_config.json`` (peft, r 128, alpha 256, dropout 0.05, every Llama linear layer),
  ``adapter_model.safetensors`` (peft keys ``base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight``
  ...), ``non_lora_trainables.bin`` (the projector under ``base_model.model.model.mm_projector.*``, as
  LLaVA's ``get_peft_state_non_lora_maybe_zero_3`` saves it) and the run's ``config.json``;
* ``weights.json``: what was written (files, bytes, parameters, seconds).

The tokenizer is a SentencePiece BPE model with Llama's layout (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, the 256
byte-fallback pieces at 3..258) and the full 32,000 pieces, trained here in about a second on the text of
this Python's own standard-library modules, so every id the random LM head can pick decodes. Tensor shapes
come from the libraries that define them (timm for the tile encoder, ``LongNetViT`` for the slide encoder,
transformers' ``LlamaForCausalLM`` built from the config through :func:`wsi_llava.model.llava_import.llama_config`),
instantiated on the meta device. Values are random: N(0, 0.02) matrices, zero biases, unit norms, LayerScale
at timm's ``init_values``. They are drawn on the GPU when there is one and written part by part (one
safetensors shard at a time in host memory). ``--tiny`` writes the same layouts at small widths for a CPU
smoke test (the tile encoder's width equals the slide encoder's input, vocabulary still 32,000).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import sysconfig
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger("make_paper_weights")

GIGAPATH_DIR = "prov-gigapath"
MERGED_DIR = "wsi-llava-v1.5-7b"
LORA_DIR = "wsi-llava-v1.5-7b-lora"
PARTS = ("gigapath", "merged", "lora")
MANIFEST = "weights.json"
#: save_pretrained's default max_shard_size in the transformers versions LLaVA-1.5 used ("5GB")
SHARD_BYTES = 5 * 10**9
STD = 0.02
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

#: LLaMA / Vicuna-7B sizes and the tiny stand-in used by --tiny
LLM_SIZES = {
    "full": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
    },
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
    },
}
VOCAB = 32000
MM_HIDDEN = 1024
TILE_SIZES = {
    "full": {"embed_dim": 1536, "depth": 40, "num_heads": 24},
    "tiny": {"embed_dim": 96, "depth": 2, "num_heads": 2},
}
SLIDE_SIZES = {"full": {"embed_dim": 768, "depth": 12}, "tiny": {"embed_dim": 64, "depth": 2}}


# --- configs, as their publishers write them -----------------------------------------------------------


def gigapath_config(size: str) -> dict[str, Any]:
    """Prov-GigaPath's hub ``config.json`` (the public fields), with the tile widths of ``size``."""
    s = TILE_SIZES[size]
    return {
        "architecture": "vit_giant_patch14_dinov2",
        "num_classes": 0,
        "num_features": s["embed_dim"],
        "global_pool": "token",
        "model_args": {
            "img_size": 224,
            "in_chans": 3,
            "patch_size": 16,
            "embed_dim": s["embed_dim"],
            "depth": s["depth"],
            "num_heads": s["num_heads"],
            "init_values": 1e-05,
            "mlp_ratio": 5.33334,
            "num_classes": 0,
        },
        "pretrained_cfg": {
            "tag": "",
            "custom_load": False,
            "input_size": [3, 224, 224],
            "fixed_input_size": True,
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
            "num_classes": 0,
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
            "license": "prov-gigapath",
        },
    }


#: the keys WSI-LLaVA's LLaVA fork adds to the Vicuna config (``LlavaLlamaForCausalLM``)
LLAVA_KEYS: dict[str, Any] = {
    "architectures": ["LlavaLlamaForCausalLM"],
    "freeze_mm_mlp_adapter": False,
    "image_aspect_ratio": "pad",
    "mm_patch_merge_type": "flat",
    "mm_projector_lr": 2e-05,
    "mm_projector_type": "mlp2x_gelu",
    "mm_use_im_patch_token": False,
    "mm_use_im_start_end": False,
    "mm_vision_select_feature": "patch",
    "mm_vision_select_layer": -2,
    "mm_vision_tower": "./LLaVA-main/clip-vit-large-patch14-336",
    "model_type": "llava_llama",
    "tokenizer_model_max_length": 2048,
    "tokenizer_padding_side": "right",
    "transformers_version": "4.37.2",
    "tune_mm_mlp_adapter": False,
    "use_mm_proj": True,
}


def llava_config(size: str, name_or_path: str = "./checkpoints/vicuna-7b-v1.5") -> dict[str, Any]:
    """A llava-v1.5-7b ``config.json`` (``LlavaLlamaForCausalLM``, as WSI-LLaVA's LLaVA fork saves it)."""
    return {
        "_name_or_path": name_or_path,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        **{k: v for k, v in LLM_SIZES[size].items() if k != "num_key_value_heads"},
        "initializer_range": 0.02,
        "max_length": 4096,
        "max_position_embeddings": 4096,
        "mm_hidden_size": MM_HIDDEN,
        "num_key_value_heads": LLM_SIZES[size]["num_key_value_heads"],
        "pad_token_id": 0,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "use_cache": True,
        "vocab_size": VOCAB,
        **LLAVA_KEYS,
    }


GENERATION_CONFIG = {
    "_from_model_config": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "max_length": 4096,
    "pad_token_id": 0,
    "transformers_version": "4.37.2",
}


def _added(content: str, typed: bool) -> dict[str, Any]:
    token = {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    return {"__type": "AddedToken", **token} if typed else token


TOKENIZER_CONFIG = {
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": _added("<s>", True),
    "clean_up_tokenization_spaces": False,
    "eos_token": _added("</s>", True),
    "legacy": False,
    "model_max_length": 2048,
    "pad_token": None,
    "padding_side": "right",
    "sp_model_kwargs": {},
    "tokenizer_class": "LlamaTokenizer",
    "unk_token": _added("<unk>", True),
}
SPECIAL_TOKENS_MAP = {
    "bos_token": _added("<s>", False),
    "eos_token": _added("</s>", False),
    "pad_token": "<unk>",
    "unk_token": _added("<unk>", False),
}


def adapter_config(base: str) -> dict[str, Any]:
    """peft's ``adapter_config.json`` for WSI-LLaVA's stage-3 LoRA (r 128, alpha 256, every Llama linear)."""
    return {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": base,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": 256,
        "lora_dropout": 0.05,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": 128,
        "rank_pattern": {},
        "revision": None,
        "target_modules": list(LORA_TARGETS),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }


# --- random tensors --------------------------------------------------------------------------------------


class Filler:
    """Random tensors drawn on ``device`` (one generator, so a run is reproducible) and returned on the CPU."""

    def __init__(self, device: str, seed: int) -> None:
        import torch

        self.device = torch.device(device)
        self.gen = torch.Generator(device=self.device).manual_seed(seed)
        self.seconds = 0.0

    def tensor(self, name: str, shape: tuple[int, ...], dtype: Any, layer_scale: float = 1e-5) -> Any:
        """A CPU tensor for parameter ``name``: zero biases, unit norm weights, LayerScale, else N(0, 0.02)."""
        import torch

        t0 = time.perf_counter()
        leaf = name.rsplit(".", 2)
        module = leaf[-2] if len(leaf) > 1 else ""
        if name.endswith(".bias"):
            out = torch.zeros(shape, dtype=dtype)
        elif len(shape) == 1 and name.endswith(".weight") and ("norm" in module or module.endswith("ln")):
            out = torch.ones(shape, dtype=dtype)
        elif name.endswith(".gamma"):
            out = torch.full(shape, layer_scale, dtype=dtype)
        else:
            x = torch.randn(shape, generator=self.gen, device=self.device, dtype=torch.float32)
            out = x.mul_(STD).to(dtype).cpu()
        self.seconds += time.perf_counter() - t0
        return out.contiguous()


def _shapes(module: Any) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# --- parts ----------------------------------------------------------------------------------------------


def write_gigapath(folder: Path, size: str, fill: Filler) -> dict[str, Any]:
    """Prov-GigaPath's hub folder: config.json, pytorch_model.bin (fp32 timm state dict), slide_encoder.pth."""
    import timm
    import torch

    from wsi_llava.slide_encoder.config import SlideEncoderConfig
    from wsi_llava.slide_encoder.longnet import LongNetViT

    folder.mkdir(parents=True, exist_ok=True)
    cfg = gigapath_config(size)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    with torch.device("meta"):
        vit = timm.create_model(cfg["architecture"], pretrained=False, **cfg["model_args"])
    shapes = _shapes(vit)
    init = float(cfg["model_args"]["init_values"])
    sd = {k: fill.tensor(k, s, torch.float32, layer_scale=init) for k, s in shapes.items()}
    torch.save(sd, folder / "pytorch_model.bin")
    tile_params = sum(_numel(s) for s in shapes.values())
    del sd

    se = SLIDE_SIZES[size]
    se_cfg = SlideEncoderConfig.gigapath(in_dim=TILE_SIZES[size]["embed_dim"], **se)
    with torch.device("meta"):
        net = LongNetViT(se_cfg)
    se_shapes = _shapes(net)
    torch.save(
        {"model": {k: fill.tensor(k, s, torch.float32) for k, s in se_shapes.items()}},
        folder / "slide_encoder.pth",
    )
    return {
        "tile_encoder_parameters": tile_params,
        "tile_encoder_tensors": len(shapes),
        "slide_encoder_parameters": sum(_numel(s) for s in se_shapes.values()),
        "slide_encoder": f"LongNet {se_cfg.depth} x {se_cfg.embed_dim}, input {se_cfg.in_dim}",
    }


def llm_shapes(size: str) -> dict[str, tuple[int, ...]]:
    """The merged LlavaLlamaForCausalLM keys in save order: the Llama keys, the projector before lm_head."""
    import torch
    from transformers import LlamaForCausalLM

    from wsi_llava.model.llava_import import llama_config

    with torch.device("meta"):
        llm = LlamaForCausalLM(llama_config(llava_config(size), Path("config.json")))
    shapes = _shapes(llm)
    hidden = LLM_SIZES[size]["hidden_size"]
    head = shapes.pop("lm_head.weight")
    shapes.update(
        {
            "model.mm_projector.0.weight": (hidden, MM_HIDDEN),
            "model.mm_projector.0.bias": (hidden,),
            "model.mm_projector.2.weight": (hidden, hidden),
            "model.mm_projector.2.bias": (hidden,),
            "lm_head.weight": head,
        }
    )
    return shapes


def _shards(shapes: dict[str, tuple[int, ...]], max_bytes: int, itemsize: int) -> list[list[str]]:
    """Keys split in order into shards of at most ``max_bytes`` (as save_pretrained cuts them)."""
    shards: list[list[str]] = [[]]
    used = 0
    for k, s in shapes.items():
        n = _numel(s) * itemsize
        if shards[-1] and used + n > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(k)
        used += n
    return shards


#: SentencePiece trainer settings of Llama's ``tokenizer.model``: BPE with byte fallback, digits split,
#: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, no pad piece, text kept as it is
LLAMA_SENTENCEPIECE = {
    "model_type": "bpe",
    "byte_fallback": True,
    "split_digits": True,
    "unk_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "pad_id": -1,
    "add_dummy_prefix": True,
    "remove_extra_whitespaces": False,
    "allow_whitespace_only_pieces": True,
    "normalization_rule_name": "identity",
    "minloglevel": 2,
}


def write_llava_tokenizer(folder: Path, lines: Iterable[str], vocab_size: int, **trainer: Any) -> int:
    """llava-v1.5-7b's SentencePiece-only tokenizer folder, its model trained on ``lines``; the piece count.

    ``tokenizer.model`` (``LLAMA_SENTENCEPIECE`` + ``trainer``), ``tokenizer_config.json`` naming
    ``LlamaTokenizer`` and ``special_tokens_map.json``; no ``tokenizer.json``, as that folder ships.
    """
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        vocab_size=vocab_size,
        **LLAMA_SENTENCEPIECE,
        **trainer,
    )
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS_MAP, indent=2) + "\n")
    return spm.SentencePieceProcessor(model_proto=buf.getvalue()).get_piece_size()


def train_tokenizer(folder: Path, vocab_size: int = VOCAB) -> dict[str, Any]:
    """A SentencePiece BPE ``tokenizer.model`` in Llama's layout, trained on the standard library's text."""
    t0 = time.perf_counter()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    lines = [
        ln.strip()
        for f in sorted(stdlib.glob("*.py"))
        for ln in f.read_text(encoding="utf-8", errors="ignore").splitlines()
        if ln.strip()
    ]
    pieces = write_llava_tokenizer(
        folder, lines, vocab_size, character_coverage=1.0, max_sentence_length=8192, num_threads=4
    )
    return {
        "pieces": pieces,
        "trained_on": f"{len(lines)} non-empty lines of {stdlib}/*.py",
        "seconds": round(time.perf_counter() - t0, 2),
    }


def write_merged(folder: Path, size: str, fill: Filler, shard_bytes: int) -> dict[str, Any]:
    """The merged LLaVA folder: config, generation config, fp16 safetensors shards + index, tokenizer."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(llava_config(size), indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    tok = train_tokenizer(folder)
    shapes = llm_shapes(size)
    groups = _shards(shapes, shard_bytes, 2)
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map: dict[str, str] = {}
    for name, keys in zip(names, groups, strict=True):
        sd = {k: fill.tensor(k, shapes[k], torch.float16) for k in keys}
        save_file(sd, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
        log.info("wrote %s (%d tensors)", name, len(keys))
        del sd
    total = sum(_numel(s) for s in shapes.values())
    index = {"metadata": {"total_size": total * 2}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return {"parameters": total, "shards": len(names), "tokenizer": tok}


def lora_shapes(size: str, r: int) -> dict[str, tuple[int, ...]]:
    """peft's adapter keys (``...q_proj.lora_A.weight`` r x in, ``lora_B`` out x r) for every target."""
    llm = llm_shapes(size)
    out: dict[str, tuple[int, ...]] = {}
    for key, shape in llm.items():
        parts = key.split(".")
        if len(parts) >= 2 and parts[-2] in LORA_TARGETS and parts[-1] == "weight":
            stem = "base_model.model." + key[: -len(".weight")]
            out[f"{stem}.lora_A.weight"] = (r, shape[1])
            out[f"{stem}.lora_B.weight"] = (shape[0], r)
    return out


def write_lora(folder: Path, size: str, fill: Filler, base_name: str) -> dict[str, Any]:
    """The LoRA output of LLaVA's finetune_lora.sh: adapter, non_lora_trainables.bin (projector), config."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    acfg = adapter_config(base_name)
    (folder / "adapter_config.json").write_text(json.dumps(acfg, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(llava_config(size, base_name), indent=2) + "\n")
    shapes = lora_shapes(size, int(acfg["r"]))
    # LLaVA's LoRA recipe trains in bf16 (--bf16 True): adapter and projector are saved in bf16
    adapter = {k: fill.tensor(k, s, torch.bfloat16) for k, s in shapes.items()}
    save_file(adapter, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    del adapter
    hidden = LLM_SIZES[size]["hidden_size"]
    proj_shapes = {
        "base_model.model.model.mm_projector.0.weight": (hidden, MM_HIDDEN),
        "base_model.model.model.mm_projector.0.bias": (hidden,),
        "base_model.model.model.mm_projector.2.weight": (hidden, hidden),
        "base_model.model.model.mm_projector.2.bias": (hidden,),
    }
    torch.save(
        {k: fill.tensor(k, s, torch.bfloat16) for k, s in proj_shapes.items()},
        folder / "non_lora_trainables.bin",
    )
    return {
        "adapter_parameters": sum(_numel(s) for s in shapes.values()),
        "adapter_tensors": len(shapes),
        "projector_parameters": sum(_numel(s) for s in proj_shapes.values()),
        "base": base_name,
    }


# --- driver ---------------------------------------------------------------------------------------------


def _files(folder: Path) -> list[dict[str, Any]]:
    return [{"name": f.name, "bytes": f.stat().st_size} for f in sorted(folder.iterdir()) if f.is_file()]


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def resolve_device(device: str) -> str:
    """``auto``: CUDA when there is a GPU (fast random numbers), else the CPU."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def make_weights(
    out: Path,
    *,
    tiny: bool = False,
    device: str = "auto",
    parts: tuple[str, ...] = PARTS,
    seed: int = 0,
    shard_bytes: int | None = None,
) -> dict[str, Any]:
    """Write the requested parts under ``out`` and ``out/weights.json``; returns the manifest."""
    size = "tiny" if tiny else "full"
    device = resolve_device(device)
    out.mkdir(parents=True, exist_ok=True)
    if shard_bytes is None:
        shard_bytes = SHARD_BYTES if not tiny else 4 * 10**6  # tiny: still several shards
    manifest: dict[str, Any] = {
        "size": size,
        "device": device,
        "seed": seed,
        "folders": {"gigapath": GIGAPATH_DIR, "merged": MERGED_DIR, "lora": LORA_DIR},
        "parts": {},
    }
    writers = {
        "gigapath": lambda f: write_gigapath(out / GIGAPATH_DIR, size, f),
        "merged": lambda f: write_merged(out / MERGED_DIR, size, f, shard_bytes),
        "lora": lambda f: write_lora(out / LORA_DIR, size, f, f"./LLaVA-main/{MERGED_DIR}/"),
    }
    for i, part in enumerate(parts):
        fill = Filler(device, seed + i)
        t0 = time.perf_counter()
        info = writers[part](fill)
        _sync(device)
        folder = out / manifest["folders"][part]
        files = _files(folder)
        info.update(
            folder=str(folder),
            files=files,
            bytes=sum(f["bytes"] for f in files),
            seconds=round(time.perf_counter() - t0, 2),
            random_seconds=round(fill.seconds, 2),
        )
        manifest["parts"][part] = info
        log.info("%s: %.2f GB in %.1f s", part, info["bytes"] / 1e9, info["seconds"])
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def print_table(manifest: dict[str, Any]) -> None:
    print(f"\nrandom weights ({manifest['size']}, drawn on {manifest['device']})")
    print(f"{'part':<10} {'folder':<28} {'files':>5} {'GB':>8} {'seconds':>8}  largest file")
    for part, info in manifest["parts"].items():
        big = max(info["files"], key=lambda f: f["bytes"])
        print(
            f"{part:<10} {Path(info['folder']).name:<28} {len(info['files']):>5} "
            f"{info['bytes'] / 1e9:>8.3f} {info['seconds']:>8.1f}  {big['name']} ({big['bytes'] / 1e9:.3f} GB)"
        )
    total = sum(i["bytes"] for i in manifest["parts"].values())
    print(
        f"{'total':<10} {'':<28} {'':>5} {total / 1e9:>8.3f} {sum(i['seconds'] for i in manifest['parts'].values()):>8.1f}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="folder to write the parts into")
    ap.add_argument("--tiny", action="store_true", help="small widths, same layouts (CPU smoke test)")
    ap.add_argument("--device", default="auto", help="where random numbers are drawn: auto, cuda, cpu")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of " + ",".join(PARTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-bytes", type=int, default=None, help="largest safetensors shard (default 5 GB)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
    if "lora" in parts and "merged" not in parts and not (args.out / MERGED_DIR).is_dir():
        log.warning("the LoRA form needs the merged folder as its base: also pass --parts merged")
    manifest = make_weights(
        args.out,
        tiny=args.tiny,
        device=args.device,
        parts=parts,
        seed=args.seed,
        shard_bytes=args.shard_bytes,
    )
    print_table(manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
