"""Our checkpoint format: a folder with ``wsi_llava.json`` and safetensors for the trained parts.

* ``wsi_llava.json``: the ``ModelSpec``; the LLM is referenced by ``spec.llm.source`` (not copied,
  unless ``save_llm=True`` puts it in ``llm/``);
* ``projector.safetensors``; ``slide_encoder.safetensors`` when there is a slide encoder;
  ``tile_encoder.safetensors`` when the tile encoder was trained here;
* ``lora/``: a peft adapter folder when the LLM carries LoRA.

A folder without ``wsi_llava.json`` is tried as an official LLaVA-format checkpoint.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from wsi_llava.errors import ModelError
from wsi_llava.model.spec import SPEC_FILE, ModelSpec

logger = logging.getLogger(__name__)

PROJECTOR_FILE = "projector.safetensors"
SLIDE_ENCODER_FILE = "slide_encoder.safetensors"
TILE_ENCODER_FILE = "tile_encoder.safetensors"
LORA_DIR = "lora"
LLM_DIR = "llm"


def _state(module: Any) -> dict[str, Any]:
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


def _is_peft(llm: Any) -> bool:
    return hasattr(llm, "peft_config") and hasattr(llm, "get_base_model")


def save_checkpoint(
    model: Any, folder: str | Path, *, save_llm: bool = False, overwrite: bool = True
) -> Path:
    """Write ``model`` (a ``WSILlava``) to ``folder`` atomically (temp folder, then rename)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    source = Path(model.spec.llm.source)
    if not save_llm and model.spec.llm.source != LLM_DIR and source.is_dir():
        from wsi_llava.model.llava_import import is_llava_checkpoint

        if is_llava_checkpoint(source):
            raise ModelError(
                f"{source}: the LLM comes from a LLaVA-format checkpoint, which load_llm cannot read; "
                "save with save_llm=True to write it into the new checkpoint"
            )
    if folder.exists() and not overwrite:
        raise ModelError(f"{folder}: already exists (pass overwrite=True to replace it)")
    if folder.exists() and any(folder.iterdir()) and not (folder / SPEC_FILE).is_file():
        raise ModelError(f"{folder}: exists and is not a wsi-llava checkpoint; refusing to replace it")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        spec = model.spec.model_copy(deep=True)
        save_file(_state(model.projector), str(tmp / PROJECTOR_FILE))
        if model.slide_encoder is not None:
            save_file(_state(model.slide_encoder), str(tmp / SLIDE_ENCODER_FILE))
            cfg = getattr(model.slide_encoder, "config", None)
            if cfg is not None and hasattr(cfg, "model_dump"):
                spec.slide_encoder = cfg.model_dump(mode="json")
        if model.tile_encoder is not None:
            save_file(_state(model.tile_encoder), str(tmp / TILE_ENCODER_FILE))
            spec.tile_encoder.weights = TILE_ENCODER_FILE
        elif spec.tile_encoder.weights and model.checkpoint_dir is not None:
            src = Path(model.checkpoint_dir) / spec.tile_encoder.weights
            if not Path(spec.tile_encoder.weights).is_absolute() and src.is_file():
                shutil.copyfile(src, tmp / spec.tile_encoder.weights)
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
            spec.llm.source = LLM_DIR
        elif spec.llm.source == LLM_DIR and model.checkpoint_dir is not None:
            shutil.copytree(Path(model.checkpoint_dir) / LLM_DIR, tmp / LLM_DIR)
        spec.save(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved checkpoint %s", folder)
    return folder


def _load_into(module: Any, path: Path, what: str) -> None:
    from safetensors.torch import load_file

    if not path.is_file():
        raise ModelError(f"{path}: missing ({what} weights of this checkpoint)")
    try:
        module.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as e:
        raise ModelError(f"{path}: {what} weights do not fit the spec ({e})") from None


def build_slide_encoder(spec: ModelSpec) -> Any:
    """A ``SlideEncoder`` from ``spec.slide_encoder`` (None when the model takes precomputed tokens)."""
    if spec.slide_encoder is None:
        return None
    from wsi_llava.encoders.slide_encoder import SlideEncoder, SlideEncoderConfig

    try:
        cfg = SlideEncoderConfig(**spec.slide_encoder)
    except Exception as e:
        raise ModelError(f"{SPEC_FILE}: slide_encoder: {e}") from None
    return SlideEncoder(cfg)


def build_tile_encoder(spec: ModelSpec, folder: Path | None) -> Any:
    """The registered tile encoder ``spec.tile_encoder.name`` (a ``TileEncoder``) with this checkpoint's weights.

    Relative weight paths resolve against the checkpoint folder; the encoder id (which keys the
    feature cache) is the weights file's checksum, or the random-init seed when there are none.
    """
    from wsi_llava.encoders.tile import build_tile_encoder as build

    weights = spec.tile_encoder.weights
    if weights is None:
        return build(spec.tile_encoder.name, weights=None)
    path = Path(weights)
    if not path.is_absolute() and folder is not None:
        path = Path(folder) / path
    if not path.exists():
        raise ModelError(f"{SPEC_FILE}: tile_encoder.weights {str(path)!r} does not exist")
    return build(spec.tile_encoder.name, weights=path)


def _llm_source(spec: ModelSpec, folder: Path) -> str | Path:
    src = spec.llm.source
    local = folder / src
    if not Path(src).is_absolute() and local.is_dir():
        return local
    return src


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
        from wsi_llava.model.llava_import import is_llava_checkpoint, load_llava

        if is_llava_checkpoint(folder):
            return load_llava(folder, model_base=model_base, device=device, dtype=dtype)
        raise ModelError(
            f"{folder}: not a wsi-llava or LLaVA checkpoint; expected {SPEC_FILE}, or config.json with "
            "mm_projector_type / mm_hidden_size (merged LLaVA), or adapter_config.json + non_lora_trainables.bin"
        )
    import torch

    from wsi_llava.model.llm import load_llm, torch_dtype
    from wsi_llava.model.projector import build_projector
    from wsi_llava.model.wsi_llava import WSILlava
    from wsi_llava.settings import default_dtype

    spec = ModelSpec.load(folder)
    tdtype = torch_dtype(dtype or default_dtype(device))
    llm, tokenizer = load_llm(_llm_source(spec, folder), dtype=tdtype, device=device)
    if spec.lora:
        from peft import PeftModel

        adapter = folder / spec.lora
        if not (adapter / "adapter_config.json").is_file():
            raise ModelError(f"{adapter}: missing adapter_config.json (spec.lora = {spec.lora!r})")
        llm = PeftModel.from_pretrained(llm, str(adapter))
        if merge_lora:
            llm = llm.merge_and_unload()
        llm.eval()
    hidden = llm.get_input_embeddings().weight.shape[1]
    if spec.projector.out_dim != hidden:
        raise ModelError(
            f"{folder / SPEC_FILE}: projector.out_dim {spec.projector.out_dim} != the LLM's hidden size {hidden}"
        )
    projector = build_projector(spec.projector.type, spec.projector.in_dim, spec.projector.out_dim)
    _load_into(projector, folder / PROJECTOR_FILE, "projector")
    projector.to(device=device, dtype=tdtype).eval()
    slide_encoder = build_slide_encoder(spec)
    if slide_encoder is not None:
        if (folder / SLIDE_ENCODER_FILE).is_file() or not spec.untrained:
            _load_into(slide_encoder, folder / SLIDE_ENCODER_FILE, "slide encoder")
        slide_encoder.to(device=device, dtype=torch.float32).eval()
    tile_encoder = None
    if spec.tile_encoder.weights == TILE_ENCODER_FILE:
        tile_encoder = build_tile_encoder(spec, folder)
    model = WSILlava(llm, tokenizer, projector, spec, slide_encoder=slide_encoder, tile_encoder=tile_encoder)
    model.checkpoint_dir = folder
    return model
