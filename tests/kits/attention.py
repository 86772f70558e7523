"""Reference attention for the LongNet tests: random float64 q, k, v and dilated attention with explicit loops."""

from __future__ import annotations

import math

import torch


def random_qkv(b, n, h, d, seed=0, grad=False):
    """``[q, k, v]``, each ``(b, n, h, d)`` float64 from one seeded generator (optionally requiring grad)."""
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(b, n, h, d, generator=g, dtype=torch.float64) for _ in range(3)]
    if grad:
        for t in out:
            t.requires_grad_(True)
    return out


def naive_dilated(q, k, v, segments, ratios):
    """Per branch, segment and head with explicit loops; zero padding attended; LSE-weighted combination."""
    b, n, h, d = q.shape
    outs = torch.zeros(len(segments), b, n, h, d, dtype=q.dtype)
    lses = torch.full((len(segments), b, n, h), -math.inf, dtype=q.dtype)
    for bi, (seg, r) in enumerate(zip(segments, ratios, strict=True)):
        w = min(seg, n)
        per_group = math.ceil(h / r)
        g = math.ceil(w / r)
        for start in range(0, math.ceil(n / w) * w, w):
            for head in range(h):
                off = head // per_group
                pos = [start + off + j * r for j in range(g)]  # positions inside the zero-padded segment
                real = [p < n and p < start + w for p in pos]

                def gather(x, pos=pos, real=real, head=head):
                    rows = [
                        x[:, p, head] if ok else torch.zeros(b, d, dtype=x.dtype)
                        for p, ok in zip(pos, real, strict=True)
                    ]
                    return torch.stack(rows, 1)

                qs, ks, vs = gather(q), gather(k), gather(v)
                s = torch.einsum("bld,bmd->blm", qs, ks) / math.sqrt(d)
                lse = s.logsumexp(-1)
                o = torch.einsum("blm,bmd->bld", s.softmax(-1), vs)
                for j, (p, ok) in enumerate(zip(pos, real, strict=True)):
                    if ok:
                        outs[bi, :, p, head] = o[:, j]
                        lses[bi, :, p, head] = lse[:, j]
    w = torch.nan_to_num(torch.softmax(lses, dim=0), nan=0.0)  # a token no branch covers gets 0, as LongNet
    return (outs * w.unsqueeze(-1)).sum(0)
