"""Our checkpoint format: a folder with ``wsi_llava.json`` and safetensors for the trained parts.

* ``wsi_llava.json``: the ``ModelSpec``; the LLM is referenced by ``spec.llm.source`` (not copied,
  unless ``save_llm=True`` puts it in ``llm/``);
* ``projector.safetensors``; ``slide_encoder.safetensors`` when there is a slide encoder;
  ``tile_encoder.safetensors`` when the tile encoder was trained here;
* ``lora/``: a peft adapter folder when the LLM carries LoRA.

A folder without ``wsi_llava.json`` is tried as an official LLaVA-format checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wsi_llava.atomic import atomic_folder
from wsi_llava.errors import ModelError
from wsi_llava.model import llava_import
from wsi_llava.model.build import (
    PROJECTOR_FILE,
    SLIDE_ENCODER_FILE,
    TILE_ENCODER_FILE,
    build_slide_encoder,
    first_line,
    load_into,
    part_path,
)
from wsi_llava.model.spec import SPEC_FILE, ModelSpec

logger = logging.getLogger(__name__)

LORA_DIR = "lora"
LLM_DIR = "llm"


def _state(module: Any) -> dict[str, Any]:
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


def _is_peft(llm: Any) -> bool:
    return hasattr(llm, "peft_config") and hasattr(llm, "get_base_model")


def save_checkpoint(
    model: Any, folder: str | Path, *, save_llm: bool = False, overwrite: bool = True
) -> Path:
    """Write ``model`` (a ``WSILlava``) to ``folder`` atomically (temp folder, then rename).

    An existing checkpoint is replaced so that at every moment the old or the new complete one is
    under ``folder``; a failure leaves the old one as it was.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ModelError(f"{folder}: exists and is not a folder; refusing to replace it")
    if folder.exists() and not overwrite:
        raise ModelError(f"{folder}: already exists (pass overwrite=True to replace it)")
    if folder.exists() and any(folder.iterdir()) and not (folder / SPEC_FILE).is_file():
        raise ModelError(f"{folder}: exists and is not a wsi-llava checkpoint; refusing to replace it")
    with atomic_folder(folder, replace=overwrite) as tmp:
        spec = model.spec.model_copy(deep=True)
        save_file(_state(model.projector), str(tmp / PROJECTOR_FILE))
        if model.slide_encoder is not None:
            save_file(_state(model.slide_encoder), str(tmp / SLIDE_ENCODER_FILE))
            cfg = getattr(model.slide_encoder, "config", None)
            if cfg is not None and hasattr(cfg, "model_dump"):
                spec.slide_encoder = cfg.model_dump(mode="json")
                spec.n_visual_tokens = cfg.n_tokens  # the stored count follows the encoder's bins
        if model.tile_encoder is not None:
            save_file(_state(model.tile_encoder), str(tmp / TILE_ENCODER_FILE))
            spec.tile_encoder.weights = TILE_ENCODER_FILE
        elif spec.tile_encoder.weights and model.checkpoint_dir is not None:
            src = Path(model.checkpoint_dir) / spec.tile_encoder.weights
            if not Path(spec.tile_encoder.weights).is_absolute() and src.is_file():
                shutil.copyfile(src, tmp / spec.tile_encoder.weights)
        if spec.feature_stats and not Path(spec.feature_stats).is_absolute():
            # keyed to the tile encoder's checksum: loading ignores them if that encoder has changed
            src = Path(model.checkpoint_dir or ".") / spec.feature_stats
            if model.checkpoint_dir is not None and src.is_file():
                shutil.copyfile(src, tmp / spec.feature_stats)
            else:
                spec.feature_stats = None
        llm = model.llm
        if _is_peft(llm):
            llm.save_pretrained(str(tmp / LORA_DIR))
            spec.lora = LORA_DIR
            llm = llm.get_base_model()
        else:
            spec.lora = None
        if save_llm:
            if _is_peft(model.llm):
                raise ModelError(
                    "save_llm=True with a LoRA model: merge the adapter first (merge_and_unload)"
                )
            llm.save_pretrained(str(tmp / LLM_DIR))
            model.tokenizer.save_pretrained(str(tmp / LLM_DIR))
            spec.llm = spec.llm.model_copy(update={"source": LLM_DIR, "format": "hf", "base": None})
        elif spec.llm.source == LLM_DIR and model.checkpoint_dir is not None:
            shutil.copytree(Path(model.checkpoint_dir) / LLM_DIR, tmp / LLM_DIR)
        spec.save(tmp)
    logger.info("saved checkpoint %s", folder)
    return folder


@contextlib.contextmanager
def peft_quietly() -> Iterator[None]:
    """Wrap peft calls that build a ``PeftModel`` (``from_pretrained``, ``get_peft_model``): peft probes
    transformers' deprecated ``is_gradient_checkpointing``, a FutureWarning that is neither ours nor the
    user's to act on, and only that warning is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        yield


def load_lora(llm: Any, adapter: Path) -> Any:
    """``llm`` wrapped with the peft adapter in ``adapter``; a missing, truncated or misfitting adapter
    raises ``ModelError`` naming its folder."""
    from peft import PeftModel

    if not (adapter / "adapter_config.json").is_file():
        raise ModelError(f"{adapter}: missing adapter_config.json (the LoRA adapter of this checkpoint)")
    try:
        with peft_quietly():
            return PeftModel.from_pretrained(llm, str(adapter))
    except Exception as e:  # SafetensorError, JSON errors, shape mismatches: peft raises many types
        raise ModelError(
            f"{adapter}: cannot load the LoRA adapter, a file is truncated, corrupt or does not fit the "
            f"LLM ({first_line(e)})"
        ) from None


def _llm_source(spec: ModelSpec, folder: Path) -> str | Path:
    src = spec.llm.source
    local = folder / src
    if not Path(src).is_absolute() and local.is_dir():
        return local
    if src.startswith("hf://"):
        from wsi_llava.sources import resolve_source

        return resolve_source(src, "LLM")
    return src


def load_language(
    spec: ModelSpec, folder: Path, device: str, dtype: Any, model_base: str | Path | None = None
) -> tuple[Any, Any, Any]:
    """``(llm, tokenizer, projector or None)`` as ``spec.llm`` says (see :class:`~wsi_llava.model.spec.LLMSpec`).

    ``model_base`` replaces the LLM folder the checkpoint names (its LoRA base for a LLaVA LoRA source),
    e.g. where a checkpoint trained elsewhere meets this machine's copy of llava-v1.5-7b.
    """
    llm_spec = spec.llm
    if llm_spec.format == "wsi-llava":
        base = (
            Path(model_base)
            if model_base
            else (part_path(folder, llm_spec.base, "LLM base") if llm_spec.base else None)
        )
        inner = load_checkpoint(
            part_path(folder, llm_spec.source, "LLM"), device=device, dtype=dtype, model_base=base
        )
        return inner.llm, inner.tokenizer, inner.projector
    if llm_spec.format == "llava":
        source = part_path(folder, llm_spec.source, "LLaVA")
        base = part_path(folder, llm_spec.base, "LLaVA base") if llm_spec.base else None
        if model_base is not None:
            if base is not None:
                base = Path(model_base)
            else:
                source = Path(model_base)
        parts = llava_import.read_llava(source, base, device=device, dtype=dtype)
        return parts.llm, parts.tokenizer, parts.projector
    from wsi_llava.model.llm import load_llm

    src = Path(model_base) if model_base is not None else _llm_source(spec, folder)
    if isinstance(src, Path) and src.is_dir() and llava_import.is_llava_checkpoint(src):
        llm, tokenizer = llava_import.load_base_llm(src, device=device, dtype=dtype)
    else:
        llm, tokenizer = load_llm(src, dtype=dtype, device=device)
    return llm, tokenizer, None


def load_checkpoint(
    folder: str | Path,
    device: str = "cpu",
    dtype: Any = None,
    *,
    model_base: str | Path | None = None,
    merge_lora: bool = True,
) -> Any:
    """A ``WSILlava`` from our format, or from a LLaVA-format folder (LoRA ones need ``model_base``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"{folder}: no such checkpoint folder")
    if not (folder / SPEC_FILE).is_file():
        if llava_import.is_llava_checkpoint(folder):
            return llava_import.load_llava(folder, model_base=model_base, device=device, dtype=dtype)
        raise ModelError(
            f"{folder}: not a wsi-llava or LLaVA checkpoint; expected {SPEC_FILE}, or config.json with "
            "mm_projector_type / mm_hidden_size (merged LLaVA), or adapter_config.json + non_lora_trainables.bin"
        )
    import torch

    from wsi_llava.model.llm import torch_dtype
    from wsi_llava.model.projector import build_projector
    from wsi_llava.model.wsi_llava import WSILlava
    from wsi_llava.settings import default_dtype

    spec = ModelSpec.load(folder)
    tdtype = torch_dtype(dtype or default_dtype(device))
    llm, tokenizer, projector = load_language(spec, folder, device, tdtype, model_base)
    if spec.lora:
        from wsi_llava.model.llm import merge_lora_weights

        if not (merge_lora and merge_lora_weights(llm, folder / spec.lora)):
            llm = load_lora(llm, folder / spec.lora)
            if merge_lora:
                llm = llm.merge_and_unload()
        llm.eval()
    hidden = llm.get_input_embeddings().weight.shape[1]
    if spec.projector.out_dim != hidden:
        raise ModelError(
            f"{folder / SPEC_FILE}: projector.out_dim {spec.projector.out_dim} != the LLM's hidden size {hidden}"
        )
    if (folder / PROJECTOR_FILE).is_file() or projector is None:  # trained here: replaces the source's
        projector = build_projector(spec.projector.type, spec.projector.in_dim, spec.projector.out_dim)
        load_into(projector, folder / PROJECTOR_FILE, "projector")
    else:
        first = next(projector.parameters())
        width = first.shape[1] if first.dim() == 2 else first.shape[0]
        if width != spec.projector.in_dim:
            raise ModelError(
                f"{folder / SPEC_FILE}: projector.in_dim {spec.projector.in_dim}, but the projector of "
                f"{spec.llm.source} takes {width}-d tokens"
            )
    projector.to(device=device, dtype=tdtype).eval()
    slide_encoder = build_slide_encoder(spec, folder)
    own_weights = (folder / SLIDE_ENCODER_FILE).is_file() or not spec.untrained
    if slide_encoder is not None and not spec.slide_encoder_weights and own_weights:
        load_into(slide_encoder, folder / SLIDE_ENCODER_FILE, "slide encoder")
    if slide_encoder is not None:
        slide_encoder.to(device=device, dtype=torch.float32).eval()
    # the tile encoder is built when a slide needs featurizing (``WSILlava.build_tile_encoder``): answers
    # about cached features never import or build it
    model = WSILlava(llm, tokenizer, projector, spec, slide_encoder=slide_encoder)
    model.checkpoint_dir = folder
    return model
