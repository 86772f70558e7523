"""Load the official LLaVA-format WSI-LLaVA checkpoints (``wsi-llava-v1.5-7b``) from local folders.

Two layouts, as LLaVA-1.5 writes them:

* merged: ``config.json`` (``LlavaLlamaForCausalLM``: ``mm_hidden_size``, ``mm_projector_type``, ...) and
  weights (``pytorch_model-*.bin`` / ``model*.safetensors``, optionally sharded with an index) holding the
  Llama keys plus ``model.mm_projector.{0,2}.*``; ``model.vision_tower.*`` is ignored (WSI-LLaVA's
  vision tower is the identity on precomputed 576x1024 features);
* LoRA: a peft adapter (``adapter_config.json`` + ``adapter_model.bin|safetensors``) and
  ``non_lora_trainables.bin`` (the projector) on top of a merged base folder passed as ``model_base``.

The result is a plain ``LlamaForCausalLM`` (LoRA merged as W + scale * B @ A) plus our projector.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

from wsi_llava.errors import ModelError

logger = logging.getLogger(__name__)

PROJECTOR_PREFIX = "model.mm_projector."
IGNORED_PREFIXES = ("model.vision_tower.", "model.image_newline")
ADAPTER_CONFIG = "adapter_config.json"
NON_LORA = "non_lora_trainables.bin"
_LLAVA_ONLY_CONFIG = re.compile(r"^(mm_|image_|tune_mm|freeze_mm|unfreeze_mm|use_mm|tokenizer_|s2)")
_PROJECTOR_KEYS = {
    "mlp2x_gelu": ("0.weight", "0.bias", "2.weight", "2.bias"),
    "linear": ("weight", "bias"),
}


def is_llava_checkpoint(folder: str | Path) -> bool:
    """Whether ``folder`` looks like a LLaVA checkpoint (merged config or LoRA adapter + projector)."""
    folder = Path(folder)
    if (folder / ADAPTER_CONFIG).is_file() or (folder / NON_LORA).is_file():
        return True
    cfg = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    archs = " ".join(cfg.get("architectures") or [])
    return "mm_hidden_size" in cfg or "mm_projector_type" in cfg or "Llava" in archs


def is_lora_checkpoint(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / ADAPTER_CONFIG).is_file() or (folder / NON_LORA).is_file()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}: not valid JSON ({e})") from None


def _load_tensor_file(path: Path) -> dict[str, Any]:
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # corrupt or truncated file
        raise ModelError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from None


def weight_files(folder: Path) -> list[Path]:
    """The weight shards of a merged checkpoint, from an index file or by name."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
            if not shards:
                raise ModelError(f"{index}: no weight_map entries")
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise ModelError(f"{index}: lists shards that are missing: {', '.join(missing)}")
            return [folder / s for s in shards]
    files = sorted(folder.glob("model*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise ModelError(
            f"{folder}: no weights found (expected model*.safetensors or pytorch_model*.bin, "
            "optionally with model.safetensors.index.json / pytorch_model.bin.index.json)"
        )
    return files


def llama_config(cfg: dict[str, Any], source: Path) -> Any:
    """A ``LlamaConfig`` from a ``LlavaLlamaForCausalLM`` config.json (LLaVA-only fields dropped)."""
    from transformers import LlamaConfig

    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if key not in cfg:
            raise ModelError(f"{source}: config.json lacks {key!r} (expected a LLaVA-Llama config)")
    kept = {
        k: v
        for k, v in cfg.items()
        if not _LLAVA_ONLY_CONFIG.match(k)
        and k not in ("architectures", "model_type", "_name_or_path", "transformers_version", "auto_map")
        and not (k == "rope_scaling" and v is None)
    }
    return LlamaConfig(**kept)


def _split(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """LLM keys and projector keys (prefix stripped); vision-tower keys are dropped."""
    llm, proj = {}, {}
    for k, v in state.items():
        if k.startswith(PROJECTOR_PREFIX):
            proj[k[len(PROJECTOR_PREFIX) :]] = v
        elif not k.startswith(IGNORED_PREFIXES):
            llm[k] = v
    return llm, proj


def _check_projector(proj: dict[str, Any], ptype: str, where: str) -> None:
    expected = _PROJECTOR_KEYS[ptype]
    missing = [PROJECTOR_PREFIX + k for k in expected if k not in proj]
    if missing:
        raise ModelError(
            f"{where}: missing projector weights {', '.join(missing)} "
            f"(mm_projector_type {ptype!r} expects {', '.join(PROJECTOR_PREFIX + k for k in expected)})"
        )


def _projector_type(cfg: dict[str, Any], source: Path) -> str:
    ptype = cfg.get("mm_projector_type", "linear")
    if ptype not in _PROJECTOR_KEYS:
        raise ModelError(
            f"{source}: mm_projector_type {ptype!r} is not supported (expected mlp2x_gelu or linear)"
        )
    if cfg.get("mm_use_im_start_end") or cfg.get("mm_use_im_patch_token"):
        raise ModelError(
            f"{source}: mm_use_im_start_end / mm_use_im_patch_token are set; WSI-LLaVA checkpoints use neither"
        )
    return ptype


def _read_merged(folder: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(config dict, LLM state dict, projector state dict) of a merged LLaVA folder."""
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder}: no config.json (expected a merged LLaVA checkpoint folder)")
    cfg = _read_json(folder / "config.json")
    llm_sd: dict[str, Any] = {}
    proj_sd: dict[str, Any] = {}
    files = weight_files(folder)
    for f in files:
        a, b = _split(_load_tensor_file(f))
        llm_sd.update(a)
        proj_sd.update(b)
    _check_projector(proj_sd, _projector_type(cfg, folder), f"{folder} ({', '.join(p.name for p in files)})")
    return cfg, llm_sd, proj_sd


def _strip_non_lora(state: dict[str, Any]) -> dict[str, Any]:
    """``base_model.model.model.mm_projector.0.weight`` -> ``model.mm_projector.0.weight`` (as LLaVA's builder)."""
    out = {(k[len("base_model.") :] if k.startswith("base_model.") else k): v for k, v in state.items()}
    if any(k.startswith("model.model.") for k in out):
        out = {(k[len("model.") :] if k.startswith("model.") else k): v for k, v in out.items()}
    return out


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    for pat, value in (patterns or {}).items():
        if module == pat or module.endswith("." + pat) or re.fullmatch(pat, module):
            return value
    return default


def merge_lora(llm_sd: dict[str, Any], adapter_dir: Path, dtype: Any = None) -> int:
    """Fold a peft LoRA adapter into ``llm_sd`` in place: W += scale * B @ A; returns modules merged.

    The sum is formed in float32 and stored in ``dtype`` (default: the weight's own dtype).
    """
    acfg = _read_json(adapter_dir / ADAPTER_CONFIG)
    if acfg.get("use_dora"):
        raise ModelError(f"{adapter_dir / ADAPTER_CONFIG}: DoRA adapters are not supported")
    files = [
        adapter_dir / n
        for n in ("adapter_model.safetensors", "adapter_model.bin")
        if (adapter_dir / n).is_file()
    ]
    if not files:
        raise ModelError(
            f"{adapter_dir}: no adapter_model.safetensors or adapter_model.bin next to {ADAPTER_CONFIG}"
        )
    state = _load_tensor_file(files[0])
    pairs: dict[str, dict[str, Any]] = {}
    for k, v in state.items():
        m = re.match(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.[A-Za-z0-9_]+)?\.weight$", k)
        if m is None:
            if "lora_embedding" in k or "lora_magnitude" in k:
                raise ModelError(f"{files[0]}: unsupported adapter key {k!r}")
            continue  # e.g. modules_to_save copies: handled by non_lora_trainables in LLaVA
        pairs.setdefault(m.group(1), {})[m.group(2)] = v
    if not pairs:
        raise ModelError(
            f"{files[0]}: no LoRA weights (expected keys like "
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight)"
        )
    r0, alpha0 = int(acfg.get("r", 8)), float(acfg.get("lora_alpha", 8))
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ModelError(f"{files[0]}: {module} has lora_{''.join(ab)} but not both lora_A and lora_B")
        key = module + ".weight"
        if key not in llm_sd:
            raise ModelError(f"{files[0]}: LoRA targets {module}, which the base model does not have ({key})")
        r = int(_pattern_value(acfg.get("rank_pattern"), module, r0))
        alpha = float(_pattern_value(acfg.get("alpha_pattern"), module, alpha0))
        scale = alpha / math.sqrt(r) if acfg.get("use_rslora") else alpha / r
        w = llm_sd[key]
        delta = ab["B"].float() @ ab["A"].float()
        if acfg.get("fan_in_fan_out"):
            delta = delta.T
        if delta.shape != w.shape:
            raise ModelError(
                f"{files[0]}: LoRA for {module} gives {tuple(delta.shape)}, weight is {tuple(w.shape)}"
            )
        llm_sd[key] = (w.float() + scale * delta).to(dtype or w.dtype)
    logger.info("merged LoRA into %d modules (r=%d, alpha=%g)", len(pairs), r0, alpha0)
    return len(pairs)


def build_llama(cfg: dict[str, Any], llm_sd: dict[str, Any], source: Path, dtype: Any, device: str) -> Any:
    """A ``LlamaForCausalLM`` holding exactly ``llm_sd`` (built on the meta device: no double memory)."""
    import torch
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = llama_config(cfg, source)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    expected = set(model.state_dict())
    if config.tie_word_embeddings:
        llm_sd.pop("lm_head.weight", None)
        expected.discard("lm_head.weight")
    missing = sorted(expected - set(llm_sd))
    unexpected = sorted(set(llm_sd) - expected)
    if missing or unexpected:
        raise ModelError(
            f"{source}: weights do not match the Llama config: missing {missing[:6]}"
            f"{' ...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}"
        )
    llm_sd = {k: v.to(dtype) for k, v in llm_sd.items()}
    try:
        model.load_state_dict(llm_sd, strict=False, assign=True)
    except RuntimeError as e:
        raise ModelError(f"{source}: weights do not fit the config ({e})") from None
    if config.tie_word_embeddings:
        model.tie_weights()
    model.model.rotary_emb = LlamaRotaryEmbedding(config=config)
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise ModelError(f"{source}: weights left uninitialised: {meta[:6]}")
    return model.to(device).eval()


def _load_tokenizer(*folders: Path) -> Any:
    """The first tokenizer that loads from ``folders`` (the checkpoint, then the LoRA base)."""
    import warnings

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    errors = []
    for folder in folders:
        previous = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # AutoTokenizer reads config.json and warns about `llava_llama`
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:  # each loader raises its own type for a folder without tokenizer files
            hint = (
                " (a tokenizer.model alone needs the sentencepiece package)"
                if (folder / "tokenizer.model").is_file()
                else ""
            )
            errors.append(f"{folder}: {type(e).__name__}: {e}{hint}")
        finally:
            hf_logging.set_verbosity(previous)
    raise ModelError("no tokenizer could be loaded: " + "; ".join(errors))


def load_llava(
    folder: str | Path,
    model_base: str | Path | None = None,
    device: str = "cpu",
    dtype: Any = None,
    template: str = "llava_v1",
) -> Any:
    """A ``WSILlava`` from an official LLaVA-format checkpoint (merged, or LoRA on ``model_base``)."""
    import torch

    from wsi_llava.model.llm import torch_dtype
    from wsi_llava.model.projector import build_projector
    from wsi_llava.model.spec import GenerationSpec, LLMSpec, ModelSpec, ProjectorSpec
    from wsi_llava.model.wsi_llava import WSILlava
    from wsi_llava.settings import default_dtype

    folder = Path(folder)
    tdtype = torch_dtype(dtype or default_dtype(device))
    if is_lora_checkpoint(folder):
        if not (folder / NON_LORA).is_file():
            raise ModelError(f"{folder}: LoRA checkpoint without {NON_LORA} (the projector weights)")
        if not (folder / ADAPTER_CONFIG).is_file():
            raise ModelError(f"{folder}: {NON_LORA} without a LoRA adapter ({ADAPTER_CONFIG})")
        if model_base is None:
            raise ModelError(
                f"{folder}: a LoRA checkpoint needs model_base= (the merged llava-v1.5-7b folder it was trained on)"
            )
        base = Path(model_base)
        cfg, llm_sd, proj_sd = _read_merged(base)
        if (folder / "config.json").is_file():  # LLaVA takes the config of the LoRA run
            cfg = _read_json(folder / "config.json")
        merge_lora(llm_sd, folder, dtype=tdtype)
        extra_llm, extra_proj = _split(_strip_non_lora(_load_tensor_file(folder / NON_LORA)))
        ptype = _projector_type(cfg, folder)
        _check_projector(extra_proj, ptype, str(folder / NON_LORA))
        proj_sd = extra_proj
        unknown = sorted(set(extra_llm) - set(llm_sd))
        if unknown:
            raise ModelError(f"{folder / NON_LORA}: keys not in the base model: {unknown[:6]}")
        llm_sd.update(extra_llm)
        tokenizer = _load_tokenizer(folder, base)
    else:
        base = None
        cfg, llm_sd, proj_sd = _read_merged(folder)
        ptype = _projector_type(cfg, folder)
        tokenizer = _load_tokenizer(folder)
    llm = build_llama(cfg, llm_sd, folder, tdtype, device)
    in_dim = int(cfg.get("mm_hidden_size", 1024))
    projector = build_projector(ptype, in_dim, int(cfg["hidden_size"]))
    try:
        projector.load_state_dict({k: v.to(torch.float32) for k, v in proj_sd.items()}, strict=True)
    except RuntimeError as e:
        raise ModelError(
            f"{folder}: projector weights do not fit {ptype} {in_dim}->{cfg['hidden_size']} ({e})"
        ) from None
    projector.to(device=device, dtype=tdtype).eval()
    spec = ModelSpec(
        name=folder.name,
        llm=LLMSpec(source=str(folder)),
        template=template,  # type: ignore[arg-type]
        projector=ProjectorSpec(type=ptype, in_dim=in_dim, out_dim=int(cfg["hidden_size"])),  # type: ignore[arg-type]
        generation=GenerationSpec(max_new_tokens=1024, temperature=0.0, no_repeat_ngram_size=3),
        n_visual_tokens=576,
    )
    model = WSILlava(llm, tokenizer, projector, spec)
    model.checkpoint_dir = folder
    logger.info("loaded LLaVA checkpoint %s%s", folder, f" on base {base}" if base else "")
    return model
