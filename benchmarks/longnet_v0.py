"""The slide encoder's dilated attention as it was before the speed work (issue 7), kept for benchmarks.

``bench_slide_encoder.py`` swaps these into :mod:`wsi_llava.slide_encoder.longnet` to time the old version on the
same card and to measure the new one's numerical difference. Not used by the package.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from wsi_llava.slide_encoder.longnet import attention_with_lse


def _head_offsets(num_heads: int, ratio: int, device: torch.device) -> torch.Tensor:
    """Offset inside each group of ``ratio`` tokens that head ``h`` reads (LongNet's head groups)."""
    per_group = -(-num_heads // ratio)  # heads padded to a multiple of ratio, split into ratio groups
    return torch.arange(num_heads, device=device) // per_group


def _dilated_branch(q, k, v, segment: int, ratio: int):
    """One (segment, ratio) branch → dense ``(B, L, H, d)`` output and ``(B, L, H)`` LSE (-inf = not covered)."""
    b, n_tok, h, d = q.shape
    seg = min(segment, n_tok)
    n_seg = -(-n_tok // seg)
    g = -(-seg // ratio)
    heads = torch.arange(h, device=q.device)
    offs = _head_offsets(h, ratio, q.device)

    def sparse(x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 0, 0, 0, 0, n_seg * seg - n_tok)).view(b, n_seg, seg, h, d)
        x = F.pad(x, (0, 0, 0, 0, 0, g * ratio - seg)).view(b, n_seg, g, ratio, h, d)
        x = x.permute(0, 1, 4, 3, 2, 5)[:, :, heads, offs]  # (b, n_seg, h, g, d)
        return x.reshape(b * n_seg, h, g, d)

    out, lse = attention_with_lse(sparse(q), sparse(k), sparse(v))
    dense = out.new_zeros(b, n_seg, h, ratio, g, d)
    dense[:, :, heads, offs] = out.view(b, n_seg, h, g, d)
    dense_lse = lse.new_full((b, n_seg, h, ratio, g), float("-inf"))
    dense_lse[:, :, heads, offs] = lse.view(b, n_seg, h, g)
    dense = dense.permute(0, 1, 4, 3, 2, 5).reshape(b, n_seg, g * ratio, h, d)[:, :, :seg]
    dense_lse = dense_lse.permute(0, 1, 4, 3, 2).reshape(b, n_seg, g * ratio, h)[:, :, :seg]
    return dense.reshape(b, n_seg * seg, h, d)[:, :n_tok], dense_lse.reshape(b, n_seg * seg, h)[:, :n_tok]


def dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilated_ratios: Sequence[int],
) -> torch.Tensor:
    """LongNet dilated attention over ``(B, L, H, d)`` projections → ``(B, L, H, d)``.

    Zero padding (to whole segments and whole dilation groups) is attended as LongNet does: padded keys
    score 0 and carry a zero value, so outputs match the released Prov-GigaPath model.
    """
    outs, lses = [], []
    for seg, ratio in zip(segment_lengths, dilated_ratios, strict=True):
        o, lse = _dilated_branch(q, k, v, int(seg), int(ratio))
        outs.append(o)
        lses.append(lse)
    if len(outs) == 1:
        return outs[0]
    lse_all = torch.stack(lses)  # (n_branch, B, L, H)
    top = lse_all.max(dim=0).values
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w = torch.exp(lse_all - top)
    w = w / w.sum(dim=0).clamp_min(1e-30)
    out = outs[0] * w[0].unsqueeze(-1).to(outs[0].dtype)
    for o, wi in zip(outs[1:], w[1:], strict=True):
        out = out + o * wi.unsqueeze(-1).to(o.dtype)
    return out


def feedforward_forward(self, x: torch.Tensor) -> torch.Tensor:
    """The old ``FeedForward.forward``: GELU through a float32 copy."""
    x = self.fc1(x)
    x = F.gelu(x.float()).type_as(x)
    return self.dropout(self.fc2(self.ffn_layernorm(x)))
