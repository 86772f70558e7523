"""``SlideEncoder``: tile features → LongNet → per-tile tokens → 576 pooled tokens → LayerNorm → zero-pad.

This is WSI-LLaVA's change to Prov-GigaPath's ``LongNetViT.forward``: the last layer's tile tokens
``x[:, 1:]`` (CLS dropped) are adaptive-average-pooled to 576 tokens, normalised by the slide encoder's
``norm`` and zero-padded to 1024 so that LLaVA-1.5's CLIP-width projector takes them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from wsi_llava.errors import ModelError
from wsi_llava.slide_encoder.config import SlideEncoderConfig
from wsi_llava.slide_encoder.longnet import LongNetViT, load_gigapath_slide_encoder
from wsi_llava.slide_encoder.pooling import pool_tokens

logger = logging.getLogger(__name__)

#: the LongNet submodule's prefix in ``SlideEncoder.state_dict()``; below it keys follow Prov-GigaPath.
LONGNET_PREFIX = "longnet."

__all__ = ["LONGNET_PREFIX", "SlideEncoder", "SlideEncoderConfig"]


class SlideEncoder(nn.Module):
    """The WSI encoder's slide level: ``forward(features, coords, tile_size_level0) -> (n_tokens, out_dim)``."""

    def __init__(self, config: SlideEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.longnet = LongNetViT(config)
        self.head: nn.Linear | None = None
        if config.head == "linear":
            self.head = nn.Linear(config.embed_dim, config.embed_dim)
            with torch.no_grad():  # identity: the untrained head leaves Prov-GigaPath's tokens unchanged
                self.head.weight.copy_(torch.eye(config.embed_dim))
                self.head.bias.zero_()

    @property
    def out_dim(self) -> int:
        return self.config.out_dim

    def _check(self, features: torch.Tensor, coords: torch.Tensor) -> None:
        if features.dim() != 2 or features.shape[1] != self.config.in_dim:
            raise ModelError(
                f"slide encoder expects tile features of shape (N, {self.config.in_dim}), got {tuple(features.shape)}"
            )
        if coords.shape != (features.shape[0], 2):
            raise ModelError(f"coords must be (N, 2) = ({features.shape[0]}, 2), got {tuple(coords.shape)}")
        if features.shape[0] == 0:
            raise ModelError("no tiles to encode: the slide or region holds no tissue tiles")

    def tile_tokens(
        self, features: torch.Tensor, coords: torch.Tensor, tile_size_level0: int
    ) -> torch.Tensor:
        """Per-tile tokens ``(N, embed_dim)``: LongNet's last layer without CLS, through the head if any."""
        self._check(features, coords)
        p = next(self.parameters())
        x = self.longnet(
            features.to(device=p.device, dtype=p.dtype).unsqueeze(0),
            coords.to(p.device).unsqueeze(0),
            int(tile_size_level0),
        )[0, 1:]
        return self.head(x) if self.head is not None else x

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(N, embed_dim)`` → pooled, normalised, zero-padded ``(n_tokens, out_dim)``."""
        x = self.longnet.norm(pool_tokens(tokens, self.config.n_tokens))
        if self.config.pad_to is not None and self.config.pad_to > x.shape[-1]:
            x = F.pad(x, (0, self.config.pad_to - x.shape[-1]))
        return x

    def forward(self, features: torch.Tensor, coords: torch.Tensor, tile_size_level0: int) -> torch.Tensor:
        """Tile features ``(N, in_dim)`` in row-major order and level-0 ``(N, 2)`` coords → visual tokens."""
        return self.pool(self.tile_tokens(features, coords, tile_size_level0))

    def load_gigapath(self, path: Path) -> SlideEncoder:
        """Fill the LongNet part from Prov-GigaPath's ``slide_encoder.pth``; the head stays as it is."""
        load_gigapath_slide_encoder(Path(path), self.longnet)
        return self

    @classmethod
    def from_gigapath(
        cls, path: Path, config: SlideEncoderConfig | None = None, **overrides: object
    ) -> SlideEncoder:
        """An encoder with Prov-GigaPath's released slide-encoder weights; widths and depth read from the file.

        ``overrides`` set the WSI-LLaVA part (``n_tokens``, ``pad_to``, ``head``); WSI-LLaVA adds no head
        to the released LongNet, so ``head`` defaults to None here.
        """
        from wsi_llava.slide_encoder.longnet import gigapath_config

        overrides.setdefault("head", None)
        return cls(config or gigapath_config(Path(path), **overrides)).load_gigapath(path)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute LongNet layers in the backward pass (long slides, Stage-1 training)."""
        self.longnet.encoder.grad_checkpointing = enable
