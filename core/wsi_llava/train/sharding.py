"""``train.strategy: fsdp`` for stages 2 and 3: the LLM and projector sharded with FSDP2 (``fully_shard``).

Each decoder layer is one FSDP unit; a root unit (``LmParts``) holds the projector, the embeddings, the
final norm and the output head, so frozen base weights, LoRA weights, the projector and the AdamW
state are all split across ranks and gradients are reduce-scattered by FSDP, not by the loop.

Checkpoints: a resumable checkpoint is sharded (``torch.distributed.checkpoint``: every rank writes its
shard of the trainable weights and optimizer state to ``step_NNNNNNN/dcp/``; frozen weights are not
saved); the final model is gathered to rank 0 and written in the usual format (projector safetensors +
peft adapter), so ``load_checkpoint`` reads it as any other.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from wsi_llava.train.config import TrainError

logger = logging.getLogger(__name__)

DCP_DIR = "dcp"


class LmParts(nn.Module):
    """The trained path of a ``WSILlava`` as one module: projector + LLM, called with the token batch.

    The root FSDP unit: its forward all-gathers the projector and the embedding table before
    ``WSILlava.embed`` uses them. Parameter names are ``projector.*`` and ``llm.*``, as in the
    loop's ``Task.trainable``.
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.projector = model.projector
        self.llm = model.llm
        object.__setattr__(self, "_model", model)  # not a submodule: its other parts stay unsharded
        self.private_group = False

    def forward(
        self, ids: torch.Tensor, visual: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, labels)`` of the spliced batch (labels with the visual positions ignored)."""
        s = self._model.embed(ids, visual, attention_mask=mask, labels=labels)
        o = self.llm(
            inputs_embeds=s.inputs_embeds,
            attention_mask=s.attention_mask,
            position_ids=s.position_ids,
            use_cache=False,
        )
        return o.logits, s.labels


def ensure_process_group(device: torch.device) -> bool:
    """FSDP needs a process group; a run on one process without torchrun gets a private one (True)."""
    if dist.is_initialized():
        return False
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=0,
        world_size=1,
    )
    return True


def _decoder_layers(llm: nn.Module) -> list[nn.Module]:
    """The LLM's repeated blocks (the Hugging Face ``_no_split_modules`` classes, e.g. LlamaDecoderLayer)."""
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:
        raise TrainError(
            f"train.strategy fsdp: cannot find the decoder layers of {type(base).__name__} "
            "(no _no_split_modules); use train.strategy: ddp"
        )
    return layers


def shard_lm(model: Any, device: torch.device, bf16: bool) -> LmParts:
    """Wrap each decoder layer, then the projector + LLM root, with ``fully_shard`` (in place).

    With ``bf16`` on CUDA, compute runs in bfloat16 and gradients are reduced in float32; the
    sharded trainable weights (the optimizer's copy) stay in their own dtype.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy()
    if bf16 and device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        dtypes = {p.dtype for p in model.llm.parameters()} | {p.dtype for p in model.projector.parameters()}
        if len(dtypes) > 1:
            raise TrainError(
                "train.strategy fsdp without bf16 compute (train.bf16 on CUDA) needs one weight dtype, got "
                f"{sorted(map(str, dtypes))}; set model.dtype: float32"
            )
    private = ensure_process_group(device)
    parts = LmParts(model)
    layers = _decoder_layers(model.llm)
    for layer in layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(parts, mp_policy=mp)
    parts.private_group = private
    logger.info("fsdp: %d decoder layers + root sharded over %d ranks", len(layers), dist.get_world_size())
    return parts


def _options(full: bool, strict: bool = True) -> Any:
    """Trainable weights only (frozen ones come from ``model.base``); ``full``: gathered to rank 0 on CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, cpu_offload=full, ignore_frozen_params=True, strict=strict)


def save_sharded(folder: Path, parts: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Every rank writes its shard of the trainable weights and optimizer state to ``folder/dcp``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(parts, opt, options=_options(False))
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(folder / DCP_DIR))


def load_sharded(folder: Path, parts: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Read ``folder/dcp`` into the sharded weights and optimizer (any world size that holds them)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not (folder / DCP_DIR).is_dir():
        raise TrainError(
            f"{folder}: a train.strategy ddp checkpoint; resume it with ddp (fsdp checkpoints keep {DCP_DIR}/)"
        )
    msd, osd = get_state_dict(parts, opt, options=_options(False))
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(folder / DCP_DIR))  # fails on a trainable weight it lacks
    set_state_dict(  # not strict: the frozen weights are not in the checkpoint
        parts,
        opt,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=_options(False, strict=False),
    )


def full_trainable(parts: nn.Module) -> dict[str, torch.Tensor]:
    """The full trainable weights on CPU, gathered to rank 0 (an empty dict on the other ranks)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(parts, options=_options(True))


class _AdapterSaver:
    """Stands in for the sharded peft model in ``save_checkpoint``: writes its adapter from full weights."""

    def __init__(self, llm: Any, state: dict[str, torch.Tensor]) -> None:
        self._llm = llm
        self._state = state
        self.peft_config = llm.peft_config

    def get_base_model(self) -> Any:
        return self._llm.get_base_model()

    def save_pretrained(self, path: str) -> None:
        self._llm.save_pretrained(path, state_dict=self._state)


def export_final(model: Any, parts: LmParts, folder: Path, main: bool) -> None:
    """Gather the trained weights and (rank 0) save ``folder`` in the usual checkpoint format."""
    from types import SimpleNamespace

    from wsi_llava.model.checkpoint import save_checkpoint
    from wsi_llava.model.projector import build_projector

    state = full_trainable(parts)  # a collective: every rank takes part
    if not main:
        return
    spec = model.spec
    proj = build_projector(spec.projector.type, spec.projector.in_dim, spec.projector.out_dim)
    proj.load_state_dict({k[len("projector.") :]: v for k, v in state.items() if k.startswith("projector.")})
    llm: Any = model.llm
    if hasattr(llm, "peft_config"):
        llm_state = {k[len("llm.") :]: v for k, v in state.items() if k.startswith("llm.")}
        llm = _AdapterSaver(model.llm, llm_state)
    view = SimpleNamespace(
        spec=spec,
        projector=proj,
        slide_encoder=model.slide_encoder,
        tile_encoder=model.tile_encoder,
        llm=llm,
        tokenizer=model.tokenizer,
        checkpoint_dir=model.checkpoint_dir,
    )
    save_checkpoint(view, folder)


def release(parts: LmParts) -> None:
    """Close the private process group ``shard_lm`` opened for a one-process run."""
    if parts.private_group and dist.is_initialized():
        dist.destroy_process_group()
        parts.private_group = False
