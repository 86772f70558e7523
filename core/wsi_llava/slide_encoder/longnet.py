"""LongNet slide encoder with dilated attention, in the shape and state-dict layout of Prov-GigaPath.

Our own implementation of the published method (LongNet, Ding et al. 2023; Prov-GigaPath's
``gigapath_slide_enc12l768d``): tile features are projected, given 2-D sin-cos positions from their tile
grid cell, prefixed with a CLS token and run through pre-LN transformer layers (sub-LN inside attention and
MLP, as torchscale's encoder). Parameter names follow Prov-GigaPath's released ``slide_encoder.pth`` so
:func:`load_gigapath_slide_encoder` loads it strictly.

Dilated attention, per branch ``(segment length w, ratio r)``: the sequence is zero-padded to a multiple of
``w`` and split into segments; inside each segment (zero-padded to a multiple of ``r``) head group ``j``
keeps the tokens at offsets ``j, j+r, j+2r, ...``, attends among them, and scatters the result back.
Branches are combined per token and head with weights ``softmax_b(lse_b)``, i.e. proportional to each
branch's softmax denominator, which equals attention over the union of the branches' keys.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from wsi_llava.errors import ModelError
from wsi_llava.slide_encoder.config import SlideEncoderConfig

logger = logging.getLogger(__name__)

__all__ = [
    "DilatedAttention",
    "LongNetViT",
    "SlideEncoderConfig",
    "attention_with_lse",
    "dilated_attention",
    "grid_positions",
    "load_gigapath_slide_encoder",
    "sincos_2d",
]

_FUSED_BROKEN: set[str] = set()
#: fused kernel for half-precision attention on CUDA: "flash" (PyTorch's FlashAttention-2), "cudnn", or
#: "auto": cuDNN for sequences of at least ``CUDNN_MIN_TOKENS`` tiles on Hopper (sm_90), else flash. On an
#: H200 (torch 2.11) cuDNN made the 12-layer encoder 1.3x faster than flash at 50k-100k tiles and 1.4x
#: slower at 10k (benchmarks/results/slide_encoder.json); a refusal falls back to flash.
CUDA_HALF_KERNEL = "auto"
CUDNN_MIN_TOKENS = 32768
_MATH_CHUNK_ELEMS = 1 << 26  # score elements per chunk on the math path (256 MB in float32)


# --------------------------------------------------------------------------------------------------------
# attention with log-sum-exp
# --------------------------------------------------------------------------------------------------------
def _attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Exact softmax attention and its LSE (at least float32), chunked over queries to bound memory."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    rows = max(1, _MATH_CHUNK_ELEMS // max(1, n_k * math.prod(q.shape[:-2])))
    acc = torch.promote_types(q.dtype, torch.float32)  # at least float32; float64 stays float64
    kf = k.to(acc).transpose(-1, -2)
    vf = v.to(acc)
    outs, lses = [], []
    for i in range(0, n_q, rows):
        s = (q[..., i : i + rows, :].to(acc) @ kf) * scale
        lse = torch.logsumexp(s, dim=-1)
        outs.append(torch.exp(s - lse.unsqueeze(-1)) @ vf)
        lses.append(lse)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)
    lse = lses[0] if len(lses) == 1 else torch.cat(lses, dim=-1)
    return out.to(v.dtype), lse.float() if acc != torch.float64 else lse


def _attention_cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """cuDNN's fused attention with its LSE (None when it refuses the shapes or is missing)."""
    if "cudnn" in _FUSED_BROKEN:
        return None
    try:
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False)
        out, lse = res[0], res[1].reshape(q.shape[:-1])
    except Exception as exc:  # noqa: BLE001 - fall back to the flash kernel
        logger.info("cuDNN attention unavailable (%s); using flash attention", exc)
        _FUSED_BROKEN.add("cudnn")
        return None
    return out, lse.float()


def _half_kernel(n_tok: int, device: torch.device) -> str:
    """The CUDA half-precision kernel for a dilated attention over ``n_tok`` tokens (see CUDA_HALF_KERNEL)."""
    if CUDA_HALF_KERNEL != "auto":
        return CUDA_HALF_KERNEL
    if (
        device.type == "cuda"
        and n_tok >= CUDNN_MIN_TOKENS
        and torch.cuda.get_device_capability(device) == (9, 0)
    ):
        return "cudnn"
    return "flash"


def _attention_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: str = "flash"):
    """PyTorch's fused kernels that also return the LSE (inference only; None when unavailable)."""
    dev = q.device.type
    if dev in _FUSED_BROKEN:
        return None
    try:
        if dev == "cpu":
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[:2]
        elif dev == "cuda":
            if q.dtype in (torch.float16, torch.bfloat16):
                cudnn = _attention_cudnn(q, k, v) if kernel == "cudnn" else None
                if cudnn is not None:
                    return cudnn
                out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]
            else:
                out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
        else:
            return None
    except Exception as exc:  # noqa: BLE001 - any kernel refusal falls back to the exact math path
        logger.info("fused attention with LSE unavailable on %s (%s); using the math path", dev, exc)
        _FUSED_BROKEN.add(dev)
        return None
    lse = lse[..., : q.shape[-2]]
    return out, lse.to(torch.promote_types(lse.dtype, torch.float32))


def _attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, kernel: str):
    """Out and LSE without a graph: a fused kernel where one takes the default scale, else the math path."""
    fused = _attention_fused(q, k, v, kernel) if math.isclose(scale, q.shape[-1] ** -0.5) else None
    return fused if fused is not None else _attention_math(q, k, v, scale)


class _AttentionLSE(torch.autograd.Function):
    """Attention with LSE whose backward recomputes the softmax chunk by chunk (as FlashAttention does).

    The forward runs without a graph (fused kernels where they exist); the backward is exact for both
    outputs, the LSE included, and holds one chunk of scores at a time, so gradients through a whole
    slide's dilated attention cost about what inference costs.
    """

    @staticmethod
    def forward(ctx, q, k, v, scale: float, kernel: str):  # noqa: ANN001, ANN205 - autograd signature
        with torch.no_grad():
            out, lse = _attention_forward(q, k, v, scale, kernel)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):  # noqa: ANN001, ANN205 - autograd signature
        q, k, v, out, lse = ctx.saved_tensors
        scale = ctx.scale
        acc = torch.promote_types(q.dtype, torch.float32)
        kf, vf = k.to(acc), v.to(acc)
        dout = torch.zeros_like(out, dtype=acc) if dout is None else dout.to(acc)
        dlse = torch.zeros_like(lse, dtype=acc) if dlse is None else dlse.to(acc)
        delta = (dout * out.to(acc)).sum(-1) - dlse  # (B, H, Lq): softmax backward's row term, LSE included
        dq = torch.empty_like(q, dtype=acc)
        dk = torch.zeros_like(kf)
        dv = torch.zeros_like(vf)
        n_q, n_k = q.shape[-2], k.shape[-2]
        rows = max(1, _MATH_CHUNK_ELEMS // max(1, n_k * math.prod(q.shape[:-2])))
        for i in range(0, n_q, rows):
            qi = q[..., i : i + rows, :].to(acc)
            p = torch.exp((qi @ kf.transpose(-1, -2)) * scale - lse[..., i : i + rows, None].to(acc))
            doi = dout[..., i : i + rows, :]
            dv += p.transpose(-1, -2) @ doi
            ds = p * ((doi @ vf.transpose(-1, -2)) - delta[..., i : i + rows, None])
            dq[..., i : i + rows, :] = (ds @ kf) * scale
            dk += (ds.transpose(-1, -2) @ qi) * scale
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, *, kernel: str = "flash"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over ``(B, H, L, d)`` tensors → ``(out (B, H, L, d), lse (B, H, L) float32)``.

    Inference uses PyTorch's fused kernels (``kernel``: "flash" or "cudnn" for CUDA half precision). With
    gradients the same forward runs inside :class:`_AttentionLSE`, whose chunked backward also
    differentiates the LSE (the branch weights), which the fused kernels do not.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if needs_grad:
        return _AttentionLSE.apply(q, k, v, scale, kernel)
    return _attention_forward(q, k, v, scale, kernel)


# --------------------------------------------------------------------------------------------------------
# dilated attention
# --------------------------------------------------------------------------------------------------------
def _pieces(n_tok: int, segment: int, ratio: int) -> list[tuple[int, int, int, int, int]]:
    """A branch's batched attention calls: ``(first token, segments, real length, slots g, zero keys)``.

    LongNet pads the sequence to whole segments of ``w = min(segment, n_tok)`` and each segment to
    ``g * ratio`` tokens; a padded key has score 0 and value 0, so it only adds ``exp(0)`` to the softmax
    denominator. The full segments are one call; a partial last segment is a second, shorter call over its
    real tokens, its missing zero keys added to the LSE analytically instead of being computed.
    """
    w = min(segment, n_tok)
    g = -(-w // ratio)
    n_full, tail = divmod(n_tok, w)
    out = []
    if n_full:
        out.append((0, n_full, w, g, 0))
    if tail:
        g_tail = -(-tail // ratio)
        out.append((n_full * w, 1, tail, g_tail, g - g_tail))
    return out


def _grouped(x: torch.Tensor, ratio: int, per_group: int) -> torch.Tensor | None:
    """``(B, S, g, ratio, H, ...)`` → view ``(B, S, g, H // per_group, per_group, ...)``: head ``h`` at offset
    ``h // per_group``. No copy; None when the heads do not split into whole groups (then loop over groups).
    """
    heads = x.shape[4]
    if heads % per_group:
        return None
    n_groups = heads // per_group
    st = x.stride()
    size = (*x.shape[:3], n_groups, per_group, *x.shape[5:])
    stride = (*st[:3], st[3] + per_group * st[4], st[4], *st[5:])
    return x.as_strided(size, stride, x.storage_offset())


def _segments(x: torch.Tensor, start: int, n_seg: int, length: int, g: int, ratio: int, n_real: int):
    """Tokens ``start ..`` of ``(B, L, H, ...)`` as ``(B, n_seg, g, ratio, H, ...)`` → ``(tensor, is_view)``.

    Each segment of ``length`` real tokens is padded to ``g * ratio``: by a view when it fits exactly, or
    for the last segment when ``x`` has spare rows past ``n_real`` (accumulators); else by a zero-padded copy.
    """
    b, rest = x.shape[0], x.shape[2:]
    span = g * ratio
    if span == length or (start + length == n_real and start + n_seg * span <= x.shape[1] and n_seg == 1):
        return x[:, start : start + n_seg * span].reshape(b, n_seg, g, ratio, *rest), True
    seg = x[:, start : start + n_seg * length].reshape(b, n_seg, length, *rest)
    seg = F.pad(seg, [0, 0] * len(rest) + [0, span - length])
    return seg.reshape(b, n_seg, g, ratio, *rest), False


def _select(x: torch.Tensor, ratio: int, per_group: int) -> torch.Tensor:
    """Each head's own offset from ``(B, S, g, ratio, H, ...)`` → contiguous ``(B, S, g, H, ...)``."""
    view = _grouped(x, ratio, per_group)
    if view is not None:
        return view.reshape(*x.shape[:3], x.shape[4], *x.shape[5:])
    heads = x.shape[4]
    parts = [x[:, :, :, h0 // per_group, h0 : h0 + per_group] for h0 in range(0, heads, per_group)]
    return torch.cat(parts, dim=3)


def _combine_(dst: torch.Tensor, src: torch.Tensor, op: str) -> None:
    if op == "add":
        dst.add_(src)
    else:  # running log-sum-exp
        dst.copy_(torch.logaddexp(dst.clone(), src))


def _scatter_(dst: torch.Tensor, src: torch.Tensor, ratio: int, per_group: int, op: str) -> None:
    """Inverse of :func:`_select`, in place: ``dst[.., offset(h), h, ..] op= src[.., h, ..]``."""
    view = _grouped(dst, ratio, per_group)
    if view is not None:
        _combine_(view, src.reshape(view.shape), op)
        return
    for h0 in range(0, dst.shape[4], per_group):
        _combine_(dst[:, :, :, h0 // per_group, h0 : h0 + per_group], src[:, :, :, h0 : h0 + per_group], op)


def _accumulate_(
    dst: torch.Tensor,
    src: torch.Tensor,
    piece: tuple[int, int, int, int],
    ratio: int,
    pg: int,
    n: int,
    op: str,
) -> None:
    """Merge a piece's per-head results ``(B, S, g, H, ...)`` into the token-major accumulator ``dst``."""
    start, n_seg, length, g = piece
    region, is_view = _segments(dst, start, n_seg, length, g, ratio, n)
    if is_view:
        _scatter_(region, src, ratio, pg, op)
        return
    fill = 0.0 if op == "add" else float("-inf")
    tmp = torch.full_like(region, fill)  # segments padded inside: positions past `length` are dropped
    _scatter_(tmp, src, ratio, pg, op)
    rest = dst.shape[2:]
    real = dst[:, start : start + n_seg * length].view(dst.shape[0], n_seg, length, *rest)
    _combine_(real, tmp.reshape(dst.shape[0], n_seg, g * ratio, *rest)[:, :, :length], op)


def dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilated_ratios: Sequence[int],
) -> torch.Tensor:
    """LongNet dilated attention over ``(B, L, H, d)`` projections → ``(B, L, H, d)``.

    Per branch the segments are batched into one fused attention call (plus one for a partial last
    segment) over each head's dilated tokens, gathered through strided views. Zero padding (to whole
    segments and whole dilation groups) is attended as LongNet does: a padded key scores 0 and carries a
    zero value, so outputs match the released Prov-GigaPath model. Branches are merged with weights
    ``exp(lse_b - logsumexp_b lse_b)``, accumulated in float32; a token no branch covers gets 0.
    """
    b, n, h, d = q.shape
    acc_dtype = torch.promote_types(v.dtype, torch.float32)
    spare = max(int(r) for r in dilated_ratios)  # rows past n for the last segment's group padding
    lse_tot = q.new_full((b, n + spare, h), float("-inf"), dtype=acc_dtype)
    kernel = _half_kernel(n, q.device)
    results = []
    for seg, ratio in zip(segment_lengths, dilated_ratios, strict=True):
        ratio = int(ratio)
        pg = -(-h // ratio)  # heads per offset group
        for start, n_seg, length, g, zeros in _pieces(n, int(seg), ratio):
            piece = (start, n_seg, length, g)

            def sparse(x: torch.Tensor, piece=piece, ratio=ratio, pg=pg) -> torch.Tensor:
                xs = _select(_segments(x, *piece, ratio, n)[0], ratio, pg)
                return xs.reshape(b * piece[1], piece[3], h, d).transpose(1, 2)

            out, lse = attention_with_lse(sparse(q), sparse(k), sparse(v), kernel=kernel)
            out = out.transpose(1, 2).reshape(b, n_seg, g, h, d)
            lse = lse.transpose(1, 2).reshape(b, n_seg, g, h).to(acc_dtype)
            full = torch.logaddexp(lse, lse.new_tensor(math.log(zeros))) if zeros else lse
            _accumulate_(lse_tot, full, piece, ratio, pg, n, "logaddexp")
            results.append((piece, ratio, pg, out, lse))
    acc = q.new_zeros((b, n + spare, h, d), dtype=acc_dtype)
    for piece, ratio, pg, out, lse in results:
        tot = _select(_segments(lse_tot, *piece, ratio, n)[0], ratio, pg)
        weight = torch.exp(lse - tot).unsqueeze(-1)
        _accumulate_(acc, out.to(acc_dtype) * weight, piece, ratio, pg, n, "add")
    return acc[:, :n].to(v.dtype)


class DilatedAttention(nn.Module):
    """Multi-head dilated self-attention with torchscale's sub-LN (``inner_attn_ln``) before ``out_proj``."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        segment_lengths: Sequence[int],
        dilated_ratios: Sequence[int],
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.segment_lengths = tuple(int(s) for s in segment_lengths)
        self.dilated_ratios = tuple(int(r) for r in dilated_ratios)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.inner_attn_ln = nn.LayerNorm(embed_dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, dim = x.shape
        shape = (b, n, self.num_heads, self.head_dim)
        q, k, v = self.q_proj(x).view(shape), self.k_proj(x).view(shape), self.v_proj(x).view(shape)
        out = dilated_attention(q, k, v, self.segment_lengths, self.dilated_ratios)
        return self.out_proj(self.inner_attn_ln(out.reshape(b, n, dim)))


class FeedForward(nn.Module):
    """fc1 → GELU (in float32) → sub-LN → fc2 (torchscale ``FeedForwardNetwork`` with ``subln``)."""

    def __init__(self, embed_dim: int, ffn_dim: int, eps: float, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, embed_dim)
        self.ffn_layernorm = nn.LayerNorm(ffn_dim, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
            x = F.gelu(x)  # CUDA computes half-precision GELU in float32: same values, no float32 copy
        else:
            x = F.gelu(x.float()).type_as(x)
        return self.dropout(self.fc2(self.ffn_layernorm(x)))


class LongNetLayer(nn.Module):
    """Pre-LN encoder layer: ``x + attn(LN(x))`` then ``x + ffn(LN(x))``."""

    def __init__(self, cfg: SlideEncoderConfig) -> None:
        super().__init__()
        d, eps = cfg.embed_dim, cfg.layernorm_eps
        self.self_attn = DilatedAttention(d, cfg.num_heads, cfg.segment_lengths, cfg.dilated_ratios, eps)
        self.self_attn_layer_norm = nn.LayerNorm(d, eps=eps)
        self.ffn = FeedForward(d, cfg.ffn_dim, eps, cfg.dropout)
        self.final_layer_norm = nn.LayerNorm(d, eps=eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.self_attn_layer_norm(x)))
        return x + self.ffn(self.final_layer_norm(x))


class LongNetEncoder(nn.Module):
    """The stack of layers plus the output LayerNorm (torchscale ``Encoder`` with ``normalize_output``)."""

    def __init__(self, cfg: SlideEncoderConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(LongNetLayer(cfg) for _ in range(cfg.depth))
        self.layer_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layernorm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x)
        for layer in self.layers:
            if self.grad_checkpointing and torch.is_grad_enabled():
                from torch.utils.checkpoint import checkpoint

                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return self.layer_norm(x)


class PatchEmbed(nn.Module):
    """Linear projection of tile features to the LongNet width."""

    def __init__(self, in_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


# --------------------------------------------------------------------------------------------------------
# positions
# --------------------------------------------------------------------------------------------------------
def grid_positions(coords: torch.Tensor, tile_size: int) -> torch.Tensor:
    """Tile grid cell ``floor(coords / tile_size)`` of level-0 ``(x, y)`` coordinates (int64)."""
    if tile_size <= 0:
        raise ModelError(f"tile_size_level0 must be a positive number of pixels, got {tile_size}")
    return torch.div(coords.to(torch.int64), int(tile_size), rounding_mode="floor")


def sincos_2d(grid: torch.Tensor, dim: int) -> torch.Tensor:
    """2-D sin-cos embedding ``(..., dim)`` of grid cells ``(..., 2)`` = ``(gx, gy)``, float32.

    Equal to the row ``gx * G + gy`` of Prov-GigaPath's ``get_2d_sincos_pos_embed(dim, G)`` table (its first
    half encodes ``gy``, its second ``gx``), computed for the given cells only instead of a 1e6-row table.
    """
    quarter = dim // 4
    dev = grid.device if grid.device.type in ("cpu", "cuda", "meta") else torch.device("cpu")
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64, device=dev) / quarter)
    g = grid.to(device=dev, dtype=torch.float64)

    def one(p: torch.Tensor) -> torch.Tensor:
        ang = p.unsqueeze(-1) * omega
        return torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1)

    return torch.cat([one(g[..., 1]), one(g[..., 0])], dim=-1).to(device=grid.device, dtype=torch.float32)


# --------------------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------------------
class LongNetViT(nn.Module):
    """Prov-GigaPath's slide encoder backbone: tile features + coords → ``(B, 1 + N, D)`` encoder output.

    ``norm`` (eps 1e-6) is part of the released weights; WSI-LLaVA applies it after pooling, so
    :class:`~wsi_llava.slide_encoder.slide_encoder.SlideEncoder` calls it, not :meth:`forward`.
    """

    def __init__(self, cfg: SlideEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.in_dim, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.encoder = LongNetEncoder(cfg)
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self._warned_grid = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Prov-GigaPath's initialisation: xavier-uniform Linear weights, zero biases, unit LayerNorms."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.cls_token, std=0.02)

    def positions(self, coords: torch.Tensor, tile_size: int) -> torch.Tensor:
        """Sin-cos position embeddings for level-0 tile coordinates ``(..., 2)``."""
        grid = grid_positions(coords, tile_size)
        g = self.cfg.slide_ngrids
        if (
            not self._warned_grid
            and not grid.is_meta
            and grid.numel()
            and (int(grid.min()) < 0 or int(grid.max()) >= g)
        ):
            logger.warning("tile grid exceeds the %dx%d positional grid; positions are extrapolated", g, g)
            self._warned_grid = True
        return sincos_2d(grid, self.cfg.embed_dim)

    def forward(self, features: torch.Tensor, coords: torch.Tensor, tile_size: int) -> torch.Tensor:
        """``(B, N, in_dim)`` features, ``(B, N, 2)`` level-0 coords → ``(B, 1 + N, embed_dim)``."""
        x = self.patch_embed(features)
        x = x + self.positions(coords, tile_size).to(x.dtype)
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)  # the CLS position embedding is zero
        return self.encoder(torch.cat([cls, x], dim=1))


# --------------------------------------------------------------------------------------------------------
# loading Prov-GigaPath's slide_encoder.pth
# --------------------------------------------------------------------------------------------------------
_WRAPPERS = ("model", "state_dict", "module")
_PREFIXES = ("module.", "model.", "slide_encoder.", "longnet.", "backbone.")
_IGNORED = ("pos_embed",)  # fixed sin-cos table (a non-persistent buffer upstream); we compute it on the fly


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from wsi_llava.features.weights import read_state_dict

    hint = " (expected Prov-GigaPath's slide_encoder.pth)"
    return read_state_dict(path, "slide encoder", _WRAPPERS, _PREFIXES, hint=hint)


def _infer_config(sd: dict[str, object], path: Path | None = None, **overrides: object) -> SlideEncoderConfig:
    """The LongNet shape of a Prov-GigaPath state dict (tensors or shapes): widths and depth from the keys."""

    def shape(k: str) -> tuple[int, ...]:
        v = sd[k]
        return tuple(v.shape) if hasattr(v, "shape") else tuple(v)  # type: ignore[arg-type, attr-defined]

    try:
        embed_dim, in_dim = shape("patch_embed.proj.weight")
        depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
        ffn = shape("encoder.layers.0.ffn.fc1.weight")[0]
    except (KeyError, ValueError) as exc:
        where = f"{path}: " if path else ""
        raise ModelError(
            f"{where}not a Prov-GigaPath slide encoder state dict (missing {exc}; expected "
            "slide_encoder.pth with patch_embed.proj.weight and encoder.layers.N.*)"
        ) from None
    return SlideEncoderConfig.gigapath(
        in_dim=in_dim, embed_dim=embed_dim, depth=depth, mlp_ratio=ffn / embed_dim, **overrides
    )


def gigapath_config(path: Path, **overrides: object) -> SlideEncoderConfig:
    """The slide encoder shape of a ``slide_encoder.pth``, read from its tensor shapes (no data read)."""
    from wsi_llava.features.weights import read_shapes

    path = Path(path)
    hint = " (expected Prov-GigaPath's slide_encoder.pth)"
    sd = read_shapes(path, "slide encoder", _WRAPPERS, _PREFIXES, hint=hint)
    cfg = _infer_config(sd, path, **overrides)
    from wsi_llava.features.weights import check_fits

    with torch.device("meta"):
        own = LongNetViT(cfg).state_dict()
    check_fits(
        own, {k: v for k, v in sd.items() if k not in _IGNORED}, path, "Prov-GigaPath slide encoder layout"
    )
    return cfg


def load_gigapath_slide_encoder(path: Path, model: LongNetViT | None = None) -> LongNetViT:
    """Load Prov-GigaPath's ``slide_encoder.pth`` (``{"model": state_dict}``) strictly into ``model``.

    With ``model=None`` a :class:`LongNetViT` is built in the paper shape, with widths and depth read from
    the file. Missing, unexpected or mis-shaped keys raise :class:`ModelError` naming a few of them.
    """
    path = Path(path)
    sd = _read_state_dict(path)
    for k in _IGNORED:
        sd.pop(k, None)
    if model is None:
        model = LongNetViT(_infer_config(sd, path))
    from wsi_llava.features.weights import check_fits

    check_fits(model.state_dict(), sd, path, "Prov-GigaPath slide encoder layout")
    model.load_state_dict(sd, strict=True)
    logger.info("loaded Prov-GigaPath slide encoder weights from %s (%d tensors)", path, len(sd))
    return model
