"""Read the official LLaVA-format WSI-LLaVA checkpoints (``wsi-llava-v1.5-7b``) from local folders.

Three layouts, exactly as LLaVA-1.5's ``train.py`` writes them and ``builder.py`` reads them:

* ``merged``: ``config.json`` (``LlavaLlamaForCausalLM``: ``mm_hidden_size``, ``mm_projector_type``, ...)
  and weights (``pytorch_model-*.bin`` / ``model*.safetensors``, optionally sharded with an index) holding
  the Llama keys plus ``model.mm_projector.{0,2}.*``; ``model.vision_tower.*`` is ignored (WSI-LLaVA's
  vision tower is the identity on precomputed 576x1024 features);
* ``lora`` (stage 3): ``config.json``, a peft adapter (``adapter_config.json`` + ``adapter_model.*``) and
  ``non_lora_trainables.bin`` (projector, keys ``base_model.model.model.mm_projector.*``) over a base that
  is a merged LLaVA folder (llava-v1.5-7b) or a plain Vicuna (``LlamaForCausalLM``) folder;
* ``projector`` (pretrain / stage 2): ``mm_projector.bin`` (keys ``model.mm_projector.*``) with
  ``config.json`` and ``trainer_state.json`` over such a base, whose own projector it replaces.

:func:`read_llava` gives a plain ``LlamaForCausalLM`` (LoRA merged as W + scale * B @ A) and the projector;
:func:`inspect_llava` runs the same checks from configs and weight-file headers only (seconds on a 7B).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict

from wsi_llava.errors import ModelError

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)

PROJECTOR_PREFIX = "model.mm_projector."
IGNORED_PREFIXES = ("model.vision_tower.", "model.vision_resampler.", "model.image_newline")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
NON_LORA = "non_lora_trainables.bin"
MM_PROJECTOR = "mm_projector.bin"
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model")
LLAVA_MODEL_TYPES = ("llava_llama", "llava")
_LLAVA_ONLY_CONFIG = re.compile(r"^(mm_|image_|tune_mm|freeze_mm|unfreeze_mm|use_mm|tokenizer_|s2)")
_IGNORED_KEY = re.compile(r"\.rotary_emb\.inv_freq$")  # saved by old transformers, recomputed on load
_LORA_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.[A-Za-z0-9_]+)?\.weight$")
_REQUIRED_LLAMA = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
)
_PROJECTOR_KEYS = {
    "mlp2x_gelu": ("0.weight", "0.bias", "2.weight", "2.bias"),
    "linear": ("weight", "bias"),
}

Kind = Literal["merged", "lora", "projector"]
Shape = tuple[int, ...]


# ----------------------------------------------------------------------------------------------- results


@dataclass
class LlavaParts:
    """What a LLaVA-format folder holds, loaded: the Llama (LoRA merged in), its tokenizer and the projector."""

    llm: Any
    tokenizer: Any
    projector: nn.Module
    projector_type: Literal["mlp2x_gelu", "linear"]
    in_dim: int
    hidden: int
    kind: Kind
    folder: Path
    base: Path | None
    config: dict[str, Any] = field(repr=False)


class LlavaInfo(BaseModel):
    """What a LLaVA-format folder holds, read from configs and weight-file headers (no tensor data)."""

    model_config = ConfigDict(extra="forbid")

    kind: Kind
    folder: Path
    base: Path | None
    hidden_size: int
    vocab_size: int
    num_hidden_layers: int
    mm_hidden_size: int
    projector_type: Literal["mlp2x_gelu", "linear"]
    projector_in: int
    projector_out: int
    weight_files: list[Path]
    n_params: int
    tokenizer_folder: Path


# ------------------------------------------------------------------------------------------- detection


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _folder_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    return _read_json(path) if path.is_file() else {}


def is_lora_checkpoint(folder: str | Path) -> bool:
    """Whether ``folder`` is LLaVA's LoRA output (``adapter_config.json`` / ``non_lora_trainables.bin``)."""
    folder = Path(folder)
    return (folder / ADAPTER_CONFIG).is_file() or (folder / NON_LORA).is_file()


def is_projector_checkpoint(folder: str | Path) -> bool:
    """Whether ``folder`` is LLaVA's pretrain (stage-2) output: ``mm_projector.bin`` without a LoRA adapter."""
    folder = Path(folder)
    return (folder / MM_PROJECTOR).is_file() and not is_lora_checkpoint(folder)


def _is_llava_config(cfg: dict[str, Any]) -> bool:
    archs = " ".join(cfg.get("architectures") or [])
    return "mm_hidden_size" in cfg or "mm_projector_type" in cfg or "Llava" in archs


def is_llava_checkpoint(folder: str | Path) -> bool:
    """Whether ``folder`` looks like a LLaVA checkpoint: merged config, LoRA output or ``mm_projector.bin``."""
    folder = Path(folder)
    if is_lora_checkpoint(folder) or is_projector_checkpoint(folder):
        return True
    try:
        return _is_llava_config(_folder_config(folder))
    except ModelError:
        return False


def _is_timm_config(cfg: dict[str, Any]) -> bool:
    """Whether ``cfg`` is a timm hub config.json (an image model such as Prov-GigaPath, not an LLM)."""
    return "architecture" in cfg and ("model_args" in cfg or "pretrained_cfg" in cfg)


def _describe(cfg: dict[str, Any]) -> str:
    archs = ", ".join(cfg.get("architectures") or []) or "no architectures"
    return f"model_type {cfg.get('model_type')!r} ({archs})"


def _check_llava_config(cfg: dict[str, Any], path: Path) -> None:
    """Refuse configs of other architectures with a message that says what the folder is instead."""
    if _is_timm_config(cfg):
        raise ModelError(
            f"{path}: a timm image-model folder (architecture {cfg['architecture']!r}), not a LLaVA "
            "checkpoint; give it as the tile encoder"
        )
    archs = cfg.get("architectures") or []
    if "text_config" in cfg or "LlavaForConditionalGeneration" in archs:
        raise ModelError(
            f"{path}: a Hugging Face-converted LLaVA ({_describe(cfg)}); expected the original LLaVA layout "
            "(LlavaLlamaForCausalLM with mm_hidden_size / mm_projector_type, as liuhaotian/llava-v1.5-7b)"
        )
    model_type = cfg.get("model_type")
    if _is_llava_config(cfg) and model_type in (*LLAVA_MODEL_TYPES, "llama", None):
        return
    if _is_llava_config(cfg):
        raise ModelError(
            f"{path}: {_describe(cfg)}: only LLaVA-Llama (Vicuna) checkpoints are supported "
            f"(model_type {' or '.join(map(repr, LLAVA_MODEL_TYPES))})"
        )
    raise ModelError(
        f"{path}: {_describe(cfg)} is not a LLaVA checkpoint; expected a LlavaLlamaForCausalLM config.json "
        "with mm_hidden_size / mm_projector_type, adapter_config.json + non_lora_trainables.bin (LoRA), "
        "or mm_projector.bin (projector only)"
    )


def _check_llama_like(cfg: dict[str, Any], path: Path, role: str) -> None:
    """A Llama (Vicuna) config, plain or LLaVA; other architectures are named and refused."""
    if _is_timm_config(cfg):
        raise ModelError(
            f"{path}: a timm image-model folder (architecture {cfg['architecture']!r}); the {role} must be "
            "a Llama (Vicuna) or merged LLaVA-Llama folder"
        )
    if cfg.get("model_type") not in ("llama", *LLAVA_MODEL_TYPES) and not _is_llava_config(cfg):
        raise ModelError(
            f"{path}: {_describe(cfg)}; the {role} must be a Llama (Vicuna, model_type 'llama') or merged "
            "LLaVA-Llama folder"
        )
    if _is_llava_config(cfg):
        _check_llava_config(cfg, path)


def llava_kind(folder: str | Path) -> Kind:
    """``merged``, ``lora`` or ``projector``; anything else raises ``ModelError`` saying what it is instead."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"{folder}: no such folder (expected a LLaVA checkpoint folder)")
    if is_lora_checkpoint(folder):
        if not (folder / NON_LORA).is_file():
            raise ModelError(f"{folder}: LoRA checkpoint without {NON_LORA} (the projector weights)")
        if not (folder / ADAPTER_CONFIG).is_file():
            raise ModelError(f"{folder}: {NON_LORA} without a LoRA adapter ({ADAPTER_CONFIG})")
        if (folder / "config.json").is_file():
            _check_llama_like(_read_json(folder / "config.json"), folder / "config.json", "LoRA config")
        return "lora"
    if is_projector_checkpoint(folder):
        if (folder / "config.json").is_file():
            _check_llama_like(_read_json(folder / "config.json"), folder / "config.json", "projector config")
        return "projector"
    if not (folder / "config.json").is_file():
        raise ModelError(
            f"{folder}: not a LLaVA checkpoint: no config.json (merged), adapter_config.json + "
            f"{NON_LORA} (LoRA) or {MM_PROJECTOR} (projector only)"
        )
    _check_llava_config(_read_json(folder / "config.json"), folder / "config.json")
    return "merged"


# ------------------------------------------------------------------------------------------ weight files


def weight_files(folder: Path) -> list[Path]:
    """The weight shards of a model folder, from an index file (every shard it names must exist) or by name."""
    for index_name in INDEX_FILES:
        index = folder / index_name
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ModelError(f"{index}: no weight_map entries")
            shards = sorted(set(weight_map.values()))
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


def _torch_load(path: Path) -> Any:
    """``torch.load`` memory-mapped (tensor data stays on disk until touched); legacy files load whole."""
    import torch

    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        # mmap needs the zip format; a legacy file loads without it and a broken one says why here
        return torch.load(str(path), map_location="cpu", weights_only=True)


def _state_of_bin(path: Path) -> dict[str, Any]:
    import torch

    try:
        state = _torch_load(path)
    except Exception as e:
        raise ModelError(
            f"{path}: cannot read weights, the file is truncated or corrupt ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path}: expected a state dict (names -> tensors), found {type(state).__name__}")
    return state


def tensor_shapes(path: Path) -> dict[str, Shape]:
    """Names and shapes of the tensors in a weights file, from its header (safetensors) or memory-mapped."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        except Exception as e:
            raise ModelError(
                f"{path}: cannot read weights, the file is truncated or corrupt ({type(e).__name__}: {e})"
            ) from None
    return {k: tuple(v.shape) for k, v in _state_of_bin(path).items()}


def _load_tensors(path: Path) -> dict[str, Any]:
    """Every tensor of a weights file (the data path; :func:`inspect_llava` never calls it)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except Exception as e:
            raise ModelError(
                f"{path}: cannot read weights, the file is truncated or corrupt ({type(e).__name__}: {e})"
            ) from None
    return _state_of_bin(path)


def _folder_shapes(folder: Path) -> tuple[dict[str, Shape], list[Path]]:
    """All tensor shapes of a model folder's shards; an index must agree with what the shards hold."""
    files = weight_files(folder)
    shapes: dict[str, Shape] = {}
    per_file: dict[str, set[str]] = {}
    for f in files:
        s = tensor_shapes(f)
        per_file[f.name] = set(s)
        shapes.update(s)
    for index_name in INDEX_FILES:
        index = folder / index_name
        if index.is_file():
            wrong = [k for k, shard in _read_json(index)["weight_map"].items() if k not in per_file[shard]]
            if wrong:
                raise ModelError(
                    f"{index}: names {len(wrong)} tensors that their shard does not hold, e.g. "
                    + ", ".join(f"{k} ({_read_json(index)['weight_map'][k]})" for k in wrong[:3])
                )
            break
    return shapes, files


# ---------------------------------------------------------------------------------------------- configs


def llama_config(cfg: dict[str, Any], source: Path) -> Any:
    """A ``LlamaConfig`` from a ``LlavaLlamaForCausalLM`` (or plain Llama) config.json, LLaVA fields dropped."""
    from transformers import LlamaConfig

    for key in _REQUIRED_LLAMA:
        if key not in cfg:
            raise ModelError(f"{source}: config.json lacks {key!r} (expected a LLaVA-Llama config)")
    kept = {
        k: v
        for k, v in cfg.items()
        if not _LLAVA_ONLY_CONFIG.match(k)
        and k not in ("architectures", "model_type", "_name_or_path", "transformers_version", "auto_map")
        and not (k == "rope_scaling" and v is None)
    }
    try:
        return LlamaConfig(**kept)
    except (TypeError, ValueError) as e:
        raise ModelError(f"{source}: config.json is not a valid Llama config ({e})") from None


def _check_mm_config(cfg: dict[str, Any], source: Path) -> None:
    if cfg.get("mm_use_im_start_end") or cfg.get("mm_use_im_patch_token"):
        raise ModelError(
            f"{source}: mm_use_im_start_end / mm_use_im_patch_token are set; WSI-LLaVA checkpoints use neither"
        )
    merge = cfg.get("mm_patch_merge_type", "flat")
    if merge != "flat":
        raise ModelError(
            f"{source}: mm_patch_merge_type {merge!r} (LLaVA-1.6 image tiling) is not supported; "
            "WSI-LLaVA uses 'flat'"
        )


def _projector_type(cfg: dict[str, Any], proj: dict[str, Shape], source: Path, where: str) -> str:
    """The projector type the config declares, checked against the keys the weights hold."""
    declared = cfg.get("mm_projector_type")
    if declared is not None and declared not in _PROJECTOR_KEYS:
        raise ModelError(
            f"{source}: mm_projector_type {declared!r} is not supported (expected mlp2x_gelu or linear)"
        )
    ptype = declared or ("mlp2x_gelu" if "0.weight" in proj else "linear")
    expected = _PROJECTOR_KEYS[ptype]
    missing = [PROJECTOR_PREFIX + k for k in expected if k not in proj]
    extra = [PROJECTOR_PREFIX + k for k in proj if k not in expected]
    if missing or extra:
        raise ModelError(
            f"{where}: projector weights do not fit mm_projector_type {ptype!r}"
            f"{' (from ' + str(source) + ')' if declared else ''}: "
            + (f"missing {', '.join(missing)}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"unexpected {', '.join(extra[:4])}" if extra else "")
            + f" (expected {', '.join(PROJECTOR_PREFIX + k for k in expected)})"
        )
    return ptype


def _split(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """LLM keys and projector keys (prefix stripped); vision-tower and rotary-buffer keys are dropped."""
    llm, proj = {}, {}
    for k, v in state.items():
        if k.startswith(PROJECTOR_PREFIX):
            proj[k[len(PROJECTOR_PREFIX) :]] = v
        elif not k.startswith(IGNORED_PREFIXES) and not _IGNORED_KEY.search(k):
            llm[k] = v
    return llm, proj


def _strip_non_lora(state: dict[str, Any]) -> dict[str, Any]:
    """``base_model.model.model.mm_projector.0.weight`` -> ``model.mm_projector.0.weight`` (as LLaVA's builder)."""
    out = {(k[len("base_model.") :] if k.startswith("base_model.") else k): v for k, v in state.items()}
    if any(k.startswith("model.model.") for k in out):
        out = {(k[len("model.") :] if k.startswith("model.") else k): v for k, v in out.items()}
    return out


def _mm_projector_state(state: dict[str, Any], path: Path) -> dict[str, Any]:
    """Projector keys of ``mm_projector.bin`` with everything up to ``mm_projector.`` stripped (as LLaVA)."""
    proj = {k.split("mm_projector.", 1)[1]: v for k, v in state.items() if "mm_projector." in k}
    other = [k for k in state if "mm_projector." not in k]
    if other:
        raise ModelError(f"{path}: holds tensors that are not the projector: {', '.join(other[:4])}")
    if not proj:
        raise ModelError(f"{path}: no projector weights (expected keys like model.mm_projector.0.weight)")
    return proj


# ------------------------------------------------------------------------------------------------ layout


@dataclass
class _Layout:
    """Which files make the model: the LLM's shards, the projector's file, the adapter, the tokenizers."""

    kind: Kind
    folder: Path
    base: Path | None
    config: dict[str, Any]
    config_path: Path
    llm_folder: Path  # the folder whose shards hold the Llama weights (the checkpoint or its base)
    base_is_llava: bool
    projector_file: Path | None  # non_lora_trainables.bin / mm_projector.bin; None: in the shards
    adapter_file: Path | None
    adapter_config: dict[str, Any] | None
    tokenizer_folders: tuple[Path, ...]


def _full_llm_config(folder: Path, role: str, *, missing: str, partial: str, expected: str) -> dict[str, Any]:
    """``config.json`` of a folder that must hold a whole LLM, not a LoRA or projector-only checkpoint.

    Messages start with ``role`` and the folder; ``missing`` follows "no such folder", ``partial`` says why a
    LoRA / projector-only folder does not do, ``expected`` what a folder without config.json should have been.
    """
    if not folder.is_dir():
        raise ModelError(f"{role} {folder}: no such folder{missing}")
    if is_lora_checkpoint(folder) or is_projector_checkpoint(folder):
        raise ModelError(f"{role} {folder}: {partial}")
    if not (folder / "config.json").is_file():
        raise ModelError(f"{role} {folder}: no config.json (expected {expected})")
    return _read_json(folder / "config.json")


def _base_config(base: Path, folder: Path, kind: str) -> dict[str, Any]:
    cfg = _full_llm_config(
        base,
        "base",
        missing=f" (the base LLM of the {kind} checkpoint {folder})",
        partial="itself a LoRA or projector-only checkpoint; the base must hold full weights "
        "(a merged LLaVA folder such as llava-v1.5-7b, or a Vicuna folder)",
        expected="a Vicuna or merged LLaVA folder",
    )
    _check_llama_like(cfg, base / "config.json", "base")
    return cfg


def _layout(folder: Path, base: Path | None) -> _Layout:
    folder = Path(folder)
    base = Path(base) if base is not None else None
    kind = llava_kind(folder)
    if kind == "merged":
        if base is not None:
            raise ModelError(
                f"{folder}: a merged LLaVA checkpoint, which takes no base (got {base}); a base is for "
                "LoRA or projector-only checkpoints"
            )
        return _Layout(
            kind="merged",
            folder=folder,
            base=None,
            config=_read_json(folder / "config.json"),
            config_path=folder / "config.json",
            llm_folder=folder,
            base_is_llava=False,
            projector_file=None,
            adapter_file=None,
            adapter_config=None,
            tokenizer_folders=(folder,),
        )
    what = "LoRA" if kind == "lora" else "projector-only"
    if base is None:
        hint = ""
        if kind == "lora":
            named = _read_json(folder / ADAPTER_CONFIG).get("base_model_name_or_path")
            hint = f"; {ADAPTER_CONFIG} names {named!r}" if named else ""
        raise ModelError(
            f"{folder}: a {what} checkpoint needs its base LLM (base= / --llava-base): the merged "
            f"llava-v1.5-7b folder or the Vicuna folder it was trained on{hint}"
        )
    base_cfg = _base_config(base, folder, what)
    own = folder / "config.json"
    cfg = _read_json(own) if own.is_file() else base_cfg  # LLaVA builds the model from the run's config
    if own.is_file():
        differ = [
            f"{k} {cfg.get(k)} vs {base_cfg.get(k)}"
            for k in _REQUIRED_LLAMA
            if k in cfg and k in base_cfg and cfg[k] != base_cfg[k]
        ]
        if differ:
            raise ModelError(
                f"{own} and base {base / 'config.json'} disagree ({'; '.join(differ)}): the base is not "
                f"the model this {what} checkpoint was trained on"
            )
    adapter_file = adapter_cfg = None
    if kind == "lora":
        adapter_cfg = _read_json(folder / ADAPTER_CONFIG)
        found = [folder / n for n in ADAPTER_FILES if (folder / n).is_file()]
        if not found:
            raise ModelError(f"{folder}: no {' or '.join(ADAPTER_FILES)} next to {ADAPTER_CONFIG}")
        adapter_file = found[0]
        if adapter_cfg.get("use_dora"):
            raise ModelError(f"{folder / ADAPTER_CONFIG}: DoRA adapters are not supported")
        if adapter_cfg.get("peft_type", "LORA") != "LORA":
            raise ModelError(
                f"{folder / ADAPTER_CONFIG}: peft_type {adapter_cfg.get('peft_type')!r}; expected LORA"
            )
    return _Layout(
        kind=kind,
        folder=folder,
        base=base,
        config=cfg,
        config_path=own if own.is_file() else base / "config.json",
        llm_folder=base,
        base_is_llava=_is_llava_config(base_cfg),
        projector_file=folder / (NON_LORA if kind == "lora" else MM_PROJECTOR),
        adapter_file=adapter_file,
        adapter_config=adapter_cfg,
        tokenizer_folders=(folder, base),
    )


# ------------------------------------------------------------------------------------------------ checks


@dataclass
class _Checked:
    """The outcome of the header-level checks: what read_llava will build."""

    llama_config: Any
    expected: dict[str, Shape]
    projector_type: str
    projector_from: Path
    in_dim: int
    hidden: int
    files: list[Path]
    n_params: int


def _few(keys: Iterable[str], n: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _expected_shapes(config: Any) -> dict[str, Shape]:
    """Names and shapes of a ``LlamaForCausalLM``'s state dict, built on the meta device (no memory)."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def _match_llama(llm: dict[str, Shape], expected: dict[str, Shape], source: str, cfg: Any) -> None:
    from wsi_llava.features.weights import misfit

    parts = misfit(expected, llm)  # type: ignore[arg-type]
    if parts:
        raise ModelError(
            f"{source}: weights do not fit the Llama config (hidden_size {cfg.hidden_size}, "
            f"{cfg.num_hidden_layers} layers, vocab_size {cfg.vocab_size}): {'; '.join(parts)}"
        )


def _lora_pairs(state: dict[str, Any], path: Path) -> dict[str, dict[str, Any]]:
    """``module -> {"A": .., "B": ..}`` from a peft adapter state (values are tensors or shapes)."""
    pairs: dict[str, dict[str, Any]] = {}
    for k, v in state.items():
        m = _LORA_KEY.match(k)
        if m is None:
            if "lora_embedding" in k or "lora_magnitude" in k:
                raise ModelError(f"{path}: unsupported adapter key {k!r}")
            continue  # e.g. modules_to_save copies: LLaVA keeps those in non_lora_trainables
        pairs.setdefault(m.group(1), {})[m.group(2)] = v
    if not pairs:
        raise ModelError(
            f"{path}: no LoRA weights (expected keys like "
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight)"
        )
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ModelError(f"{path}: {module} has lora_{''.join(ab)} but not both lora_A and lora_B")
    return pairs


def _check_lora(layout: _Layout, expected: dict[str, Shape]) -> list[Path]:
    assert layout.adapter_file is not None and layout.adapter_config is not None
    path = layout.adapter_file
    pairs = _lora_pairs(tensor_shapes(path), path)
    fan_in_fan_out = bool(layout.adapter_config.get("fan_in_fan_out"))
    absent, wrong = [], []
    for module, ab in pairs.items():
        key = module + ".weight"
        if key not in expected:
            absent.append(module)
            continue
        (r_a, n_in), (n_out, r_b) = tuple(ab["A"]), tuple(ab["B"])
        delta = (n_in, n_out) if fan_in_fan_out else (n_out, n_in)
        if r_a != r_b or delta != expected[key]:
            wrong.append(f"{module} A {tuple(ab['A'])} B {tuple(ab['B'])} vs weight {expected[key]}")
    if absent:
        raise ModelError(f"{path}: LoRA targets modules the base model does not have: {_few(absent, 4)}")
    if wrong:
        raise ModelError(f"{path}: LoRA shapes do not fit the base model: {'; '.join(wrong[:3])}")
    return [path]


def _check(layout: _Layout) -> _Checked:
    """Every check that needs no tensor data: shards, key sets and shapes, projector, LoRA targets."""
    cfg = layout.config
    _check_mm_config(cfg, layout.config_path)
    config = llama_config(cfg, layout.config_path)
    shard_shapes, files = _folder_shapes(layout.llm_folder)
    llm, proj = _split(shard_shapes)
    projector_from = layout.llm_folder
    where = f"{layout.llm_folder} ({', '.join(p.name for p in files)})"
    if layout.kind != "merged":
        assert layout.projector_file is not None
        extra = tensor_shapes(layout.projector_file)
        files = [*files, layout.projector_file]
        if layout.kind == "projector":
            proj, projector_from = _mm_projector_state(extra, layout.projector_file), layout.projector_file
            where = str(layout.projector_file)
        else:
            extra_llm, extra_proj = _split(_strip_non_lora(extra))
            if extra_proj:
                proj, projector_from, where = extra_proj, layout.projector_file, str(layout.projector_file)
            elif not (layout.base_is_llava and proj):
                raise ModelError(
                    f"{layout.projector_file}: no projector weights (expected keys like "
                    "base_model.model.model.mm_projector.0.weight), and the base holds none either"
                )
            else:
                logger.info("%s holds no projector: keeping the base's", layout.projector_file)
            unknown = sorted(set(extra_llm) - set(llm))
            if unknown:
                raise ModelError(
                    f"{layout.projector_file}: tensors the base model does not have: {_few(unknown)}"
                )
            wrong = [k for k in extra_llm if tuple(extra_llm[k]) != tuple(llm[k])]
            if wrong:
                raise ModelError(
                    f"{layout.projector_file}: tensors whose shape differs from the base: "
                    + ", ".join(f"{k} {tuple(extra_llm[k])} vs {tuple(llm[k])}" for k in wrong[:3])
                )
    if not proj:
        raise ModelError(
            f"{where}: no projector weights (expected {PROJECTOR_PREFIX}0.weight ... for mlp2x_gelu)"
        )
    expected = _expected_shapes(config)
    if config.tie_word_embeddings:
        llm.pop("lm_head.weight", None)
    _match_llama(llm, expected, where if layout.kind == "merged" else f"base {where}", config)
    ptype = _projector_type(cfg, proj, layout.config_path, where)
    first = tuple(proj["0.weight" if ptype == "mlp2x_gelu" else "weight"])
    if len(first) != 2:
        raise ModelError(f"{where}: the projector's first weight has shape {first}; expected (out, in)")
    out_dim, in_dim = first
    hidden = int(config.hidden_size)
    if out_dim != hidden:
        raise ModelError(
            f"{where}: the projector gives {out_dim}-d embeddings but the LLM's hidden_size is {hidden} "
            f"({layout.config_path}); the projector was trained for another LLM"
        )
    want = (
        {"0.weight": (hidden, in_dim), "0.bias": (hidden,), "2.weight": (hidden, hidden), "2.bias": (hidden,)}
        if ptype == "mlp2x_gelu"
        else {"weight": (hidden, in_dim), "bias": (hidden,)}
    )
    wrong = [
        f"{PROJECTOR_PREFIX}{k} {tuple(proj[k])} (expected {s})"
        for k, s in want.items()
        if tuple(proj[k]) != s
    ]
    if wrong:
        raise ModelError(
            f"{where}: projector shapes do not fit {ptype} {in_dim}->{hidden}: {', '.join(wrong)}"
        )
    declared_in = cfg.get("mm_hidden_size")
    if declared_in is not None and int(declared_in) != in_dim:
        raise ModelError(
            f"{where}: the projector takes {in_dim}-d tokens but {layout.config_path} says mm_hidden_size "
            f"{declared_in}"
        )
    if layout.kind == "lora":
        files = [*files, *_check_lora(layout, expected)]
    n_params = sum(math.prod(s) for s in expected.values()) + sum(math.prod(s) for s in want.values())
    return _Checked(
        llama_config=config,
        expected=expected,
        projector_type=ptype,
        projector_from=projector_from,
        in_dim=int(in_dim),
        hidden=hidden,
        files=files,
        n_params=n_params,
    )


# --------------------------------------------------------------------------------------------- tokenizer


def _protobuf_missing() -> bool:
    try:
        return importlib.util.find_spec("google.protobuf") is None
    except ModuleNotFoundError:
        return True


def _tokenizer_from(*folders: Path) -> tuple[Any, Path]:
    """The first tokenizer that loads from ``folders``, and the folder it came from."""
    import warnings

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    problems = []
    for folder in folders:
        folder = Path(folder)
        present = [n for n in TOKENIZER_FILES if (folder / n).is_file()]
        if not present:
            problems.append(f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])})")
            continue
        sentencepiece_only = "tokenizer.model" in present and "tokenizer.json" not in present
        if sentencepiece_only and _protobuf_missing():
            problems.append(
                f"{folder}: tokenizer.model (SentencePiece) without tokenizer.json needs the protobuf "
                "package (pip install protobuf)"
            )
            continue
        previous = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # AutoTokenizer reads config.json and warns about `llava_llama`
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                return AutoTokenizer.from_pretrained(str(folder), local_files_only=True), folder
        except Exception as e:  # each tokenizer class raises its own type for files it cannot read
            problems.append(f"{folder}: {type(e).__name__}: {e}")
        finally:
            hf_logging.set_verbosity(previous)
    raise ModelError("no tokenizer could be loaded: " + "; ".join(problems))


def load_tokenizer(*folders: str | Path) -> Any:
    """The tokenizer of the first of ``folders`` that holds one that loads (e.g. the checkpoint, then its base).

    SentencePiece-only folders (``tokenizer.model`` + ``tokenizer_config.json``, as llava-v1.5-7b ships them)
    are converted by transformers itself, which reads the SentencePiece model through protobuf.
    """
    if not folders:
        raise ModelError("no tokenizer could be loaded: no folder given")
    return _tokenizer_from(*(Path(f) for f in folders))[0]


# ---------------------------------------------------------------------------------------------- building


def _lora_scale(acfg: dict[str, Any], module: str) -> float:
    r = int(_pattern_value(acfg.get("rank_pattern"), module, int(acfg.get("r", 8))))
    alpha = float(_pattern_value(acfg.get("alpha_pattern"), module, float(acfg.get("lora_alpha", 8))))
    return alpha / math.sqrt(r) if acfg.get("use_rslora") else alpha / r


def _pattern_value(patterns: dict[str, Any] | None, module: str, default: Any) -> Any:
    for pat, value in (patterns or {}).items():
        if module == pat or module.endswith("." + pat) or re.fullmatch(pat, module):
            return value
    return default


def merge_lora(llm_sd: dict[str, Any], adapter_dir: Path, dtype: Any = None) -> int:
    """Fold a peft LoRA adapter into ``llm_sd`` in place: W += scale * B @ A; returns the modules merged.

    The sum is formed in float32 on the weight's device and stored in ``dtype`` (default: the weight's own
    dtype).
    """
    adapter_dir = Path(adapter_dir)
    acfg = _read_json(adapter_dir / ADAPTER_CONFIG)
    if acfg.get("use_dora"):
        raise ModelError(f"{adapter_dir / ADAPTER_CONFIG}: DoRA adapters are not supported")
    files = [adapter_dir / n for n in ADAPTER_FILES if (adapter_dir / n).is_file()]
    if not files:
        raise ModelError(f"{adapter_dir}: no {' or '.join(ADAPTER_FILES)} next to {ADAPTER_CONFIG}")
    pairs = _lora_pairs(_load_tensors(files[0]), files[0])
    for module, ab in pairs.items():
        key = module + ".weight"
        if key not in llm_sd:
            raise ModelError(f"{files[0]}: LoRA targets {module}, which the base model does not have ({key})")
        w = llm_sd[key]
        delta = ab["B"].to(w.device).float() @ ab["A"].to(w.device).float()  # where the weight lives (CUDA)
        if acfg.get("fan_in_fan_out"):
            delta = delta.T
        if delta.shape != w.shape:
            raise ModelError(
                f"{files[0]}: LoRA for {module} gives {tuple(delta.shape)}, weight is {tuple(w.shape)}"
            )
        llm_sd[key] = (w.float() + _lora_scale(acfg, module) * delta).to(dtype or w.dtype)
    logger.info(
        "merged LoRA into %d modules (r=%s, alpha=%s)", len(pairs), acfg.get("r"), acfg.get("lora_alpha")
    )
    return len(pairs)


def build_llama(cfg: dict[str, Any], llm_sd: dict[str, Any], source: Path, dtype: Any, device: str) -> Any:
    """A ``LlamaForCausalLM`` holding exactly ``llm_sd`` (built on the meta device: no double memory)."""
    import torch
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = llama_config(cfg, source)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    if config.tie_word_embeddings:
        llm_sd.pop("lm_head.weight", None)
    _match_llama(
        {k: tuple(v.shape) for k, v in llm_sd.items()}, _expected_shapes(config), str(source), config
    )
    for k in list(llm_sd):  # one tensor at a time, so the originals can go as they are converted
        llm_sd[k] = llm_sd[k].to(dtype)
    model.load_state_dict(llm_sd, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.model.rotary_emb = LlamaRotaryEmbedding(config=config)
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise ModelError(f"{source}: weights left uninitialised: {meta[:6]}")
    return model.to(device).eval()


def _llm_state(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    llm_sd: dict[str, Any] = {}
    proj_sd: dict[str, Any] = {}
    for f in weight_files(folder):
        a, b = _split(_load_tensors(f))
        llm_sd.update(a)
        proj_sd.update(b)
    return llm_sd, proj_sd


def _torch_dtype(dtype: Any, device: str) -> Any:
    from wsi_llava.model.llm import torch_dtype
    from wsi_llava.settings import default_dtype

    return torch_dtype(dtype or default_dtype(device))


# ------------------------------------------------------------------------------------------------ public


def inspect_llava(folder: str | Path, base: str | Path | None = None) -> LlavaInfo:
    """Check a LLaVA-format folder (over ``base``) from configs and weight-file headers only.

    Names the file at fault for a missing or truncated shard, keys or shapes that do not fit the Llama
    config, a projector that does not fit mm_hidden_size -> hidden_size, LoRA targets the base lacks, or
    a tokenizer that does not load; seconds on a 7B folder (used by ``wsi-llava models add/check``).
    """
    layout = _layout(Path(folder), Path(base) if base is not None else None)
    checked = _check(layout)
    tokenizer, tok_folder = _tokenizer_from(*layout.tokenizer_folders)
    vocab = int(checked.llama_config.vocab_size)
    if len(tokenizer) > vocab:
        raise ModelError(
            f"{tok_folder}: the tokenizer has {len(tokenizer)} tokens but the LLM's vocab_size is {vocab} "
            f"({layout.config_path})"
        )
    return LlavaInfo(
        kind=layout.kind,
        folder=layout.folder,
        base=layout.base,
        hidden_size=checked.hidden,
        vocab_size=vocab,
        num_hidden_layers=int(checked.llama_config.num_hidden_layers),
        mm_hidden_size=int(layout.config.get("mm_hidden_size", checked.in_dim)),
        projector_type=checked.projector_type,  # type: ignore[arg-type]
        projector_in=checked.in_dim,
        projector_out=checked.hidden,
        weight_files=checked.files,
        n_params=checked.n_params,
        tokenizer_folder=tok_folder,
    )


def read_llava(
    folder: str | Path, base: str | Path | None = None, *, device: str = "cpu", dtype: Any = None
) -> LlavaParts:
    """Load a LLaVA-format folder (merged, or LoRA / projector-only over ``base``) after the header checks.

    The LLM is a plain ``LlamaForCausalLM`` with any LoRA merged in; the projector is on ``device`` in
    ``dtype`` (default: :func:`wsi_llava.settings.default_dtype`).
    """
    import torch

    from wsi_llava.model.projector import build_projector

    layout = _layout(Path(folder), Path(base) if base is not None else None)
    checked = _check(layout)
    tdtype = _torch_dtype(dtype, device)
    llm_sd, proj_sd = _llm_state(layout.llm_folder)
    if layout.kind == "projector":
        assert layout.projector_file is not None
        proj_sd = _mm_projector_state(_state_of_bin(layout.projector_file), layout.projector_file)
    elif layout.kind == "lora":
        assert layout.projector_file is not None
        # as LLaVA's builder: non-LoRA trainables go into the base first, then the LoRA is merged
        extra_llm, extra_proj = _split(_strip_non_lora(_state_of_bin(layout.projector_file)))
        llm_sd.update(extra_llm)
        if extra_proj:
            proj_sd = extra_proj
        merge_lora(llm_sd, layout.folder, dtype=tdtype)
    llm = build_llama(layout.config, llm_sd, layout.llm_folder, tdtype, device)
    ptype, in_dim, hidden = checked.projector_type, checked.in_dim, checked.hidden
    projector = build_projector(ptype, in_dim, hidden)
    projector.load_state_dict({k: v.to(torch.float32) for k, v in proj_sd.items()}, strict=True)
    projector.to(device=device, dtype=tdtype).eval()
    tokenizer = load_tokenizer(*layout.tokenizer_folders)
    logger.info(
        "read LLaVA %s checkpoint %s%s (projector from %s)",
        layout.kind,
        layout.folder,
        f" over {layout.base}" if layout.base else "",
        checked.projector_from,
    )
    return LlavaParts(
        llm=llm,
        tokenizer=tokenizer,
        projector=projector,
        projector_type=ptype,  # type: ignore[arg-type]
        in_dim=in_dim,
        hidden=hidden,
        kind=layout.kind,
        folder=layout.folder,
        base=layout.base,
        config=layout.config,
    )


def load_base_llm(folder: str | Path, *, device: str = "cpu", dtype: Any = None) -> tuple[Any, Any]:
    """``(llm, tokenizer)`` of a Hugging Face causal-LM folder, or the Llama part of a merged LLaVA folder.

    A merged LLaVA folder (e.g. llava-v1.5-7b, the LLM our stage-3 checkpoints name) loses its projector
    and vision-tower keys; a LoRA or projector-only folder is refused (it has no full LLM of its own).
    """
    folder = Path(folder)
    cfg = _full_llm_config(
        folder,
        "LLM",
        missing="",
        partial="a LoRA or projector-only LLaVA checkpoint holds no full LLM; give its base "
        "(e.g. llava-v1.5-7b) or load it with its base as a LLaVA source",
        expected="a Hugging Face model folder",
    )
    tdtype = _torch_dtype(dtype, device)
    if _is_llava_config(cfg):
        _check_llava_config(cfg, folder / "config.json")
        config = llama_config(cfg, folder / "config.json")
        shapes, _ = _folder_shapes(folder)
        llm_shapes, _ = _split(shapes)
        if config.tie_word_embeddings:
            llm_shapes.pop("lm_head.weight", None)
        _match_llama(llm_shapes, _expected_shapes(config), str(folder), config)
        llm_sd, _ = _llm_state(folder)
        llm = build_llama(cfg, llm_sd, folder, tdtype, device)
    else:
        llm = _auto_causal_lm(folder, cfg, tdtype, device)
    tokenizer = load_tokenizer(folder)
    logger.info("loaded base LLM %s", folder)
    return llm, tokenizer


def _auto_causal_lm(folder: Path, cfg: dict[str, Any], dtype: Any, device: str) -> Any:
    """``AutoModelForCausalLM`` of a plain folder; weights that do not fit the config are an error, not random."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if _is_timm_config(cfg):
        raise ModelError(
            f"LLM {folder}: a timm image-model folder (architecture {cfg['architecture']!r}), not a language model"
        )
    weight_files(folder)  # a clear message for a missing shard before transformers tries
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=dtype, local_files_only=True, output_loading_info=True
        )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelError(f"LLM {folder}: {_describe(cfg)} cannot be loaded as a causal LM ({e})") from None
    finally:
        hf_logging.set_verbosity(previous)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
    if bad:
        raise ModelError(
            f"LLM {folder}: weights do not fit config.json: "
            + "; ".join(f"{k.replace('_', ' ')} {_few(str(x) for x in v)}" for k, v in bad.items())
        )
    return model.to(device).eval()


def load_llava(
    folder: str | Path,
    model_base: str | Path | None = None,
    device: str = "cpu",
    dtype: Any = None,
    template: str = "llava_v1",
) -> Any:
    """A ``WSILlava`` from an official LLaVA-format checkpoint (merged, or LoRA / projector over ``model_base``)."""
    from wsi_llava.model.spec import GenerationSpec, LLMSpec, ModelSpec, ProjectorSpec
    from wsi_llava.model.wsi_llava import WSILlava

    folder = Path(folder)
    parts = read_llava(folder, model_base, device=device, dtype=dtype)
    spec = ModelSpec(
        name=folder.name,
        llm=LLMSpec(source=str(folder), format="llava", base=str(model_base) if model_base else None),
        template=template,  # type: ignore[arg-type]
        projector=ProjectorSpec(type=parts.projector_type, in_dim=parts.in_dim, out_dim=parts.hidden),
        generation=GenerationSpec(max_new_tokens=1024, temperature=0.0, no_repeat_ngram_size=3),
        n_visual_tokens=576,
    )
    model = WSILlava(parts.llm, parts.tokenizer, parts.projector, spec)
    model.checkpoint_dir = folder
    return model
