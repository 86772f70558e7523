"""``SlideEncoderConfig``: the shape of the LongNet slide encoder and its 576-token output (no torch here)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: Prov-GigaPath's segment lengths for ``max_wsi_size=262144`` and 256-px tiles: 2**linspace(10, 20, 5), truncated.
GIGAPATH_SEGMENT_LENGTHS = (1024, 5792, 32768, 185363, 1048576)
GIGAPATH_DILATED_RATIOS = (1, 2, 4, 8, 16)


class SlideEncoderConfig(BaseModel):
    """LongNet (dilated attention) over tile features, then pooling to ``n_tokens`` and zero-padding."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    in_dim: int = Field(1536, gt=0, description="tile feature width (Prov-GigaPath tile encoder: 1536)")
    embed_dim: int = Field(768, gt=0, description="LongNet width")
    depth: int = Field(12, ge=1)
    num_heads: int = Field(16, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    segment_lengths: tuple[int, ...] = GIGAPATH_SEGMENT_LENGTHS
    dilated_ratios: tuple[int, ...] = GIGAPATH_DILATED_RATIOS
    dropout: float = Field(0.0, ge=0, lt=1)
    layernorm_eps: float = Field(1e-5, gt=0, description="LongNet's inner LayerNorms (torchscale default)")
    norm_eps: float = Field(1e-6, gt=0, description="the final LayerNorm applied after pooling")
    slide_ngrids: int = Field(1000, gt=0, description="positional grid edge in tiles (Prov-GigaPath: 1000)")
    n_tokens: int = Field(576, gt=0, description="tokens after adaptive average pooling")
    pad_to: int | None = Field(1024, description="zero-pad the token width to this (LLaVA-1.5's CLIP width)")
    head: Literal["linear"] | None = Field(
        "linear",
        description="a Linear after LongNet (paper figure), identity-initialised so it starts as a no-op",
    )

    @model_validator(mode="after")
    def _check(self) -> SlideEncoderConfig:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} must be divisible by num_heads {self.num_heads}")
        if (self.embed_dim // 2) % 2:
            raise ValueError(f"embed_dim {self.embed_dim} must be divisible by 4 (2-D sin-cos positions)")
        if len(self.segment_lengths) != len(self.dilated_ratios) or not self.segment_lengths:
            raise ValueError("segment_lengths and dilated_ratios must be non-empty and of equal length")
        if any(s < 1 for s in self.segment_lengths) or any(r < 1 for r in self.dilated_ratios):
            raise ValueError("segment_lengths and dilated_ratios must be positive")
        if self.pad_to is not None and self.pad_to < self.embed_dim:
            raise ValueError(f"pad_to {self.pad_to} must be >= embed_dim {self.embed_dim}")
        return self

    @property
    def out_dim(self) -> int:
        """Width of each output token."""
        return self.pad_to if self.pad_to is not None else self.embed_dim

    @property
    def ffn_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @classmethod
    def gigapath(cls, **overrides: object) -> SlideEncoderConfig:
        """The paper shape: Prov-GigaPath ``gigapath_slide_enc12l768d`` → 576 tokens → pad to 1024."""
        return cls(**overrides)

    @classmethod
    def demo(cls, in_dim: int = 192, **overrides: object) -> SlideEncoderConfig:
        """A small LongNet for the embedded demo model (fast on a laptop CPU)."""
        base: dict[str, object] = dict(
            in_dim=in_dim,
            embed_dim=192,
            depth=2,
            num_heads=4,
            mlp_ratio=4.0,
            segment_lengths=(64, 256, 1024),
            dilated_ratios=(1, 2, 4),
            slide_ngrids=1000,
            n_tokens=576,
            pad_to=None,
        )
        base.update(overrides)
        return cls(**base)
