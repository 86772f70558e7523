"""Tile-text alignment (demo recipe, before stage 1): train the tile encoder against region descriptions.

The paper starts from a pretrained pathology tile encoder (Prov-GigaPath); none can be downloaded here,
so the demo trains its small ViT: each tile of an annotated region is pulled towards the frozen text
embedding of the region's description and pushed from the others (symmetric InfoNCE, learnable
temperature, identical descriptions count as positives). The result is one weights file,
``final/tile_encoder.safetensors``, in the layout a checkpoint carries.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any, Unpack

import torch
import torch.nn.functional as F
from torch import nn

from wsi_llava.train.config import TileStageConfig, TrainError
from wsi_llava.train.loop import Dist, RunArgs, autocast_for, named_trainable, seed_everything, train_loop
from wsi_llava.train.stage1 import (
    TextEncoder,
    contrastive_heads,
    contrastive_loss,
    contrastive_task,
    encode_texts,
    resolve_text_encoder,
    save_heads,
)
from wsi_llava.train.tile_pack import TileTextData, load_tile_packs

logger = logging.getLogger(__name__)

HEADS_FILE = "tile_heads.safetensors"
METRICS_FILE = "tiles_metrics.json"


def split_slides(slides: list[str], val_fraction: float, seed: int) -> set[str]:
    """The held-out slides: a seeded ``val_fraction`` of the distinct slide keys (at least one when > 0)."""
    uniq = sorted(set(slides))
    if val_fraction <= 0 or len(uniq) < 2:
        return set()
    n = min(len(uniq) - 1, max(1, round(val_fraction * len(uniq))))
    return set(random.Random(seed).sample(uniq, n))


def augment(x: torch.Tensor) -> torch.Tensor:
    """Random horizontal flip and 90-degree rotation of each tile (``B x 3 x s x s``); torch RNG."""
    flip = torch.rand(x.shape[0]) < 0.5
    x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
    turns = torch.randint(0, 4, (x.shape[0],))
    out = x.clone()
    for k in (1, 2, 3):
        sel = (turns == k).nonzero().flatten().to(x.device)
        if sel.numel():
            out[sel] = torch.rot90(x[sel], k, dims=(-2, -1))
    return out


def zero_shot_accuracy(
    encoder: Any, head: nn.Module, text_z: torch.Tensor, data: TileTextData, idx: list[int], device: Any
) -> dict[str, Any]:
    """Each tile's nearest description (cosine) vs its own: overall and per description."""
    if not idx:
        return {"n": 0}
    hits: dict[int, list[int]] = {}
    encoder.eval()
    with torch.no_grad():
        for i in range(0, len(idx), 256):
            sel = idx[i : i + 256]
            x = data.tiles[sel].to(device).float().div_(255.0)
            z = F.normalize(head(encoder((x - encoder.mean) / encoder.std).float()), dim=-1)
            pred = (z @ text_z.T).argmax(1).cpu().tolist()
            for j, p in zip(sel, pred, strict=True):
                hits.setdefault(data.text_ids[j], [0, 0])
                hits[data.text_ids[j]][0] += int(p == data.text_ids[j])
                hits[data.text_ids[j]][1] += 1
    correct = sum(h[0] for h in hits.values())
    return {
        "n": len(idx),
        "accuracy": round(correct / len(idx), 4),
        "per_description": {
            data.texts[t][:80]: {"n": h[1], "accuracy": round(h[0] / h[1], 4)}
            for t, h in sorted(hits.items())
        },
    }


def _text_features(cfg: TileStageConfig, data: TileTextData) -> torch.Tensor:
    """Frozen embeddings of the descriptions: from the packs when made with this text encoder, else computed."""
    made = data.text_encoder or {}
    if data.text_features is not None and made == {
        "name": cfg.text_encoder,
        "max_length": cfg.text_max_length,
    }:
        return data.text_features.float()
    text = TextEncoder(resolve_text_encoder(cfg.text_encoder), cfg.text_max_length).eval()
    return encode_texts(text, data.texts).float()


def run_tile_stage(cfg: TileStageConfig, out: Path, d: Dist, **run: Unpack[RunArgs]) -> Path:
    """Train the tile encoder on tile-text pairs; save ``out/final/tile_encoder.safetensors`` + metrics."""
    from safetensors.torch import save_file

    from wsi_llava.atomic import atomic_folder
    from wsi_llava.features.tile import build_tile_encoder
    from wsi_llava.model.checkpoint import TILE_ENCODER_FILE, _state

    seed_everything(cfg.train.seed)
    data = load_tile_packs(cfg.data.tile_packs)
    if data.tile_encoder != cfg.tile_encoder:
        raise TrainError(
            f"the tile packs were made for {data.tile_encoder!r}, the config trains {cfg.tile_encoder!r}"
        )
    val_slides = split_slides(data.slides, cfg.data.val_fraction, cfg.train.seed)
    train_idx = [i for i, s in enumerate(data.slides) if s not in val_slides]
    val_idx = [i for i, s in enumerate(data.slides) if s in val_slides]
    if len(set(data.text_ids[i] for i in train_idx)) < 2:
        raise TrainError("tile-text alignment needs at least two different region descriptions")
    encoder = build_tile_encoder(cfg.tile_encoder, weights=cfg.init_weights).to(d.device)
    if tuple(data.tiles.shape[-2:]) != (encoder.input_size, encoder.input_size):
        raise TrainError(
            f"tile pack tiles are {tuple(data.tiles.shape[-2:])} px, the encoder takes {encoder.input_size}"
        )
    encoder.requires_grad_(True)
    text_feats = _text_features(cfg, data).to(d.device)
    heads, holder = contrastive_heads(
        {"tile": encoder.embed_dim, "text": text_feats.shape[1]},
        cfg.embed_dim,
        cfg.init_temperature,
        d.device,
    )
    trainable = named_trainable({"tile_encoder": encoder.model, "heads": heads, "temp": holder})
    text_ids = torch.tensor(data.text_ids)

    def loss_sum(micro: list[int]) -> torch.Tensor:
        sel = [train_idx[i] for i in micro]
        x = data.tiles[sel].to(d.device, non_blocking=True).float().div_(255.0)
        if cfg.augment:
            x = augment(x)
        zt = F.normalize(heads["tile"](encoder((x - encoder.mean) / encoder.std).float()), dim=-1)
        ids = text_ids[sel].to(d.device)
        zx = F.normalize(heads["text"](text_feats[ids]), dim=-1)
        same = (ids[:, None] == ids[None, :]).float()
        return contrastive_loss(zt, zx, same, holder.logit_scale)

    task = contrastive_task(
        "tiles",
        "tile-text alignment",
        len(train_idx),
        trainable,
        cfg.optim.lr,
        cfg.train.batch_size,
        loss_sum,
        autocast=autocast_for(cfg.train, d),
        train_mode=lambda: encoder.train(),
    )
    result = train_loop(task, cfg.train, cfg.optim, out, d, **run)
    final = out / "final"
    if result["stopped_early"] or not d.main:
        return final
    with torch.no_grad():
        text_z = F.normalize(heads["text"](text_feats), dim=-1)
    rng = random.Random(cfg.train.seed)
    metrics = {
        "final_loss": result["last_loss"],
        "steps": result["steps"],
        "tiles": {"train": len(train_idx), "val": len(val_idx)},
        "slides": {"train": len(set(data.slides) - val_slides), "val": len(val_slides)},
        "descriptions": len(data.texts),
        "zero_shot_val": zero_shot_accuracy(encoder, heads["tile"], text_z, data, val_idx, d.device),
        "zero_shot_train_sample": zero_shot_accuracy(
            encoder,
            heads["tile"],
            text_z,
            data,
            sorted(rng.sample(train_idx, min(2000, len(train_idx)))),
            d.device,
        ),
    }
    logger.info("tiles: held-out zero-shot accuracy %s", metrics["zero_shot_val"].get("accuracy"))
    encoder.cpu().float()
    with atomic_folder(final, replace=True) as tmp:  # a crash leaves the old final/ or none, never half
        save_file(_state(encoder), str(tmp / TILE_ENCODER_FILE))
        save_heads(heads, holder.logit_scale, tmp / HEADS_FILE)
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
    return final
