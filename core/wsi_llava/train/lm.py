"""Stages 2 and 3: language-model training on (visual tokens, question, answer) samples.

Stage 2 trains the projector alone (LLM and encoders frozen) on report captions; stage 3 trains the
projector and a peft LoRA on the LLM over all tasks, open and close-ended mixed. The loss covers the
answer tokens only (``WSILlava.prompt`` masks the rest) and is summed then divided by the answer
tokens of the whole global batch. With ``train.strategy: fsdp`` the LLM and projector are sharded
across ranks (``sharding.shard_lm``) before the optimizer is built.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Unpack

import torch
import torch.nn.functional as F

from wsi_llava.model.templates import IGNORE_INDEX
from wsi_llava.train.config import Stage2Config, Stage3Config, TrainError
from wsi_llava.train.data import Sample, TrainData, load_train_data
from wsi_llava.train.loop import (
    Dist,
    RunArgs,
    Task,
    autocast_for,
    count_params,
    named_trainable,
    seed_everything,
    train_loop,
)

logger = logging.getLogger(__name__)


def load_base(cfg: Stage2Config | Stage3Config, d: Dist) -> Any:
    """The starting ``WSILlava`` on this rank's device (LoRA of a base checkpoint merged in, or kept).

    The adapter is kept, to train on, with ``lora.from_base`` (stage 3).
    """
    from wsi_llava.errors import WsiLlavaError

    if cfg.model.llm or cfg.model.slide_encoder:
        raise TrainError(
            "model.llm / model.slide_encoder apply to stage 1 (base: demo); later stages read them from the checkpoint"
        )
    dtype = cfg.model.dtype or ("bfloat16" if d.device.type == "cuda" and cfg.train.bf16 else "float32")
    device = str(d.device)
    try:
        if cfg.model.base == "demo":
            from wsi_llava.model.demo import build_untrained_demo

            model = build_untrained_demo(device=device, dtype=dtype)
        else:
            from wsi_llava.model.checkpoint import load_checkpoint

            keep = isinstance(cfg, Stage3Config) and cfg.lora.from_base
            model = load_checkpoint(cfg.model.base, device=device, dtype=dtype, merge_lora=not keep)
    except WsiLlavaError as e:
        raise TrainError(f"model.base {cfg.model.base!r}: {e}") from None
    if cfg.model.template:
        model.spec.template = cfg.model.template
    if cfg.model.name:
        model.spec.name = cfg.model.name
    if cfg.model.region_prompt is not None:
        model.spec.region_prompt = cfg.model.region_prompt
    return model


class Tokenized:
    """Prompt ids and labels of every sample, truncated to ``max_length`` positions (visual included)."""

    def __init__(self, model: Any, samples: list[Sample], max_length: int) -> None:
        n_vis = model.n_visual_tokens
        room = max_length - n_vis + 1
        if room < 8:
            raise TrainError(
                f"data.max_length {max_length} leaves no room for text after {n_vis} visual tokens"
            )
        self.ids: list[list[int]] = []
        self.labels: list[list[int]] = []
        self.n_answer: list[int] = []
        self.samples: list[Sample] = []
        dropped = 0
        for s in samples:
            scope = "region" if s.tiles is not None else "slide"  # as SlideSession asks it
            parts = model.prompt(model.spec.model_question(s.question, scope), s.answer)
            ids, labels = parts.input_ids[:room], (parts.labels or [])[:room]
            n_answer = sum(1 for x in labels[1:] if x != IGNORE_INDEX)
            if n_answer == 0:  # the prompt alone fills max_length: nothing to learn from
                dropped += 1
                continue
            self.samples.append(s)
            self.ids.append(ids)
            self.labels.append(labels)
            self.n_answer.append(n_answer)
        if dropped:
            logger.warning(
                "%d sample(s) dropped: no answer token fits in data.max_length %d", dropped, max_length
            )
        if not self.samples:
            raise TrainError(
                f"no sample has room for its answer within data.max_length {max_length}; raise it"
            )
        self.lengths = [len(i) + n_vis - 1 for i in self.ids]

    def collate(self, idx: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        width = max(len(self.ids[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        labels = torch.full((len(idx), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            n = len(self.ids[i])
            ids[r, :n] = torch.tensor(self.ids[i])
            labels[r, :n] = torch.tensor(self.labels[i])
            mask[r, :n] = 1
        return ids, labels, mask


class VisualTokens:
    """Visual tokens of a sample from the frozen slide encoder (memoised per slide/region) or a .pt file."""

    def __init__(self, model: Any, data: TrainData, device: torch.device) -> None:
        self.model = model
        self.data = data
        self.device = device
        self.memo: dict[tuple[str, tuple[int, ...] | None], torch.Tensor] = {}
        self.in_dim = model.spec.projector.in_dim

    @torch.no_grad()
    def get(self, s: Sample) -> torch.Tensor:
        """Tokens in float32, outside any autocast: exactly what inference computes."""
        key = (s.slide, s.tiles)
        t = self.memo.get(key)
        if t is None:
            with torch.autocast(self.device.type, enabled=False):
                t = self._compute(s)
            self.memo[key] = t
        return t

    def _compute(self, s: Sample) -> torch.Tensor:
        sf = self.data.features_for(s)
        if sf.is_tokens:
            t = sf.features.load()
            if t.shape[1] != self.in_dim:
                raise TrainError(
                    f"{sf.features.path}: token width {t.shape[1]} != projector in_dim {self.in_dim}"
                )
        else:
            f, c = sf.features, sf.coords
            if s.tiles is not None:
                sel = torch.as_tensor(s.tiles, dtype=torch.long)
                f, c = f[sel], c[sel]
            t = self.model.encode_slide(f, c, sf.tile_size_level0)
        return t.to(self.device, torch.float32)


def check_pack_encoder(model: Any, data: TrainData) -> None:
    """Packs must come from the model's own tile encoder (features of another encoder mean nothing)."""
    if not data.encoder_ids or model.slide_encoder is None:
        return
    from wsi_llava.model.build import tile_encoder_id

    want = tile_encoder_id(model.spec, model.checkpoint_dir, getattr(model, "tile_encoder", None))
    if want not in data.encoder_ids:
        raise TrainError(
            f"the feature packs were made with {sorted(data.encoder_ids)}, but the model's tile encoder is "
            f"{want}; re-run `wsi-llava train prepare` with --weights set to the model's tile encoder"
        )


def answer_loss_sum(logits: torch.Tensor, labels: torch.Tensor, weighting: str) -> torch.Tensor:
    """Summed answer loss of a batch (``logits`` B x T x V, ``labels`` B x T, already shifted).

    ``token``: the sum over answer tokens; ``sample``: the sum over samples of each one's mean token loss
    (the loop divides by answer tokens or by samples with an answer, see ``Task.count``).
    """
    sel = labels != IGNORE_INDEX
    if weighting == "token":
        return F.cross_entropy(logits[sel].float(), labels[sel], reduction="sum")
    tok_loss = F.cross_entropy(logits[sel].float(), labels[sel], reduction="none")
    rows = sel.nonzero()[:, 0]
    per_sample = torch.zeros(labels.shape[0], device=tok_loss.device, dtype=tok_loss.dtype)
    per_sample = per_sample.index_add(0, rows, tok_loss)
    n = sel.sum(dim=1)
    keep = n > 0
    return (per_sample[keep] / n[keep]).sum()


def run_lm_stage(
    cfg: Stage2Config | Stage3Config,
    out: Path,
    d: Dist,
    **run: Unpack[RunArgs],
) -> Path:
    """Train stage 2 or 3 and save the model (our checkpoint format) to ``out/final``."""
    from wsi_llava.model.checkpoint import save_checkpoint

    seed_everything(cfg.train.seed)
    data = load_train_data(cfg.data)
    samples = data.samples
    if isinstance(cfg, Stage2Config):
        keep = set(cfg.caption_tasks)
        samples = [s for s in samples if s.task in keep]
        if not samples:
            raise TrainError(f"stage 2: no samples of the caption tasks {sorted(keep)}")
    model = load_base(cfg, d)
    check_pack_encoder(model, data)
    model.requires_grad_(False)
    model.projector.float().requires_grad_(True)
    groups: list[dict[str, Any]]
    modules: dict[str, torch.nn.Module] = {"projector": model.projector}
    if isinstance(cfg, Stage3Config) and cfg.lora.from_base:
        if not hasattr(model.llm, "peft_config"):
            raise TrainError(f"lora.from_base: model.base {cfg.model.base!r} has no LoRA adapter to train on")
        for name, p in model.llm.named_parameters():
            if "lora_" in name:
                p.requires_grad_(True)
        modules["llm"] = model.llm
    elif isinstance(cfg, Stage3Config):
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules,
            bias="none",
            task_type="CAUSAL_LM",
        )
        from wsi_llava.model.checkpoint import peft_quietly

        with peft_quietly():
            model.llm = get_peft_model(model.llm, lcfg)
        modules["llm"] = model.llm
    if cfg.train.grad_checkpointing:
        model.llm.gradient_checkpointing_enable()
    parts = None
    if cfg.train.strategy == "fsdp":
        from wsi_llava.train.sharding import shard_lm

        # fully_shard swaps each parameter for a sharded one: collect them after this
        parts = shard_lm(model, d.device, cfg.train.bf16)
        modules = {"projector": model.projector, **({"llm": model.llm} if "llm" in modules else {})}
    trainable = named_trainable(modules)
    if isinstance(cfg, Stage3Config):
        lora = [p for k, p in trainable.items() if k.startswith("llm.")]
        groups = [
            {"params": lora, "lr": cfg.optim.lr},
            {"params": list(model.projector.parameters()), "lr": cfg.optim.projector_lr or cfg.optim.lr},
        ]
    else:
        groups = [{"params": list(trainable.values()), "lr": cfg.optim.lr}]
    logger.info(
        "%s: %d samples, %d trainable parameters",
        cfg.stage,
        len(samples),
        count_params(list(trainable.values())),
    )
    tok = Tokenized(model, samples, cfg.data.max_length)
    samples = tok.samples
    vis = VisualTokens(model, data, d.device)
    pad_id = model.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = model.tokenizer.eos_token_id or 0
    by_token = cfg.loss_weighting == "token"

    def loss_sum(idx: list[int]) -> torch.Tensor:
        ids, labels, mask = tok.collate(idx, pad_id)
        visual = torch.stack([vis.get(samples[i]) for i in idx])
        if parts is not None:
            logits, spliced_labels = parts(ids.to(d.device), visual, mask.to(d.device), labels.to(d.device))
            return answer_loss_sum(logits[:, :-1], spliced_labels[:, 1:], cfg.loss_weighting)
        s = model.embed(
            ids.to(d.device), visual, attention_mask=mask.to(d.device), labels=labels.to(d.device)
        )
        o = model.llm(
            inputs_embeds=s.inputs_embeds,
            attention_mask=s.attention_mask,
            position_ids=s.position_ids,
            use_cache=False,
        )
        return answer_loss_sum(o.logits[:, :-1], s.labels[:, 1:], cfg.loss_weighting)

    def train_mode() -> None:
        model.projector.train()
        if isinstance(cfg, Stage3Config):
            model.llm.train()

    task = Task(
        stage=cfg.stage,
        lengths=tok.lengths,
        trainable=trainable,
        param_groups=groups,
        count=lambda m: float(sum(tok.n_answer[i] if by_token else tok.n_answer[i] > 0 for i in m)),
        loss_sum=loss_sum,
        autocast=autocast_for(cfg.train, d),
        train_mode=train_mode,
        fsdp=parts,
    )
    result = train_loop(task, cfg.train, cfg.optim, out, d, **run)
    final = out / "final"
    if not result["stopped_early"]:
        model.eval()
        model.spec.untrained = False
        if parts is not None:
            from wsi_llava.train.sharding import export_final

            export_final(model, parts, final, d.main)  # gathered to rank 0: the usual format
        elif d.main:
            save_checkpoint(model, final)
    if parts is not None:
        from wsi_llava.train.sharding import release

        release(parts)
    return final
