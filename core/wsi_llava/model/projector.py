"""The visual projector between slide tokens and the LLM's embedding space (LLaVA's ``mm_projector``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from wsi_llava.errors import ModelError

if TYPE_CHECKING:
    from torch import nn

PROJECTOR_TYPES = ("mlp2x_gelu", "linear")


def build_projector(type: str, in_dim: int, out_dim: int) -> nn.Module:
    """``mlp2x_gelu`` = Linear-GELU-Linear (state-dict keys ``0.*``, ``2.*`` as in LLaVA) or ``linear``."""
    from torch import nn

    if type == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    if type == "linear":
        return nn.Linear(in_dim, out_dim)
    raise ModelError(f"projector type {type!r}: expected one of {', '.join(PROJECTOR_TYPES)}")
