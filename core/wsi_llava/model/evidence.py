"""Evidence: how much each tile raised the probability of an answer, through the whole model.

Integrated gradients of the answer's log-probability with respect to the tile features, along a straight
path from a reference slide (every tile replaced by the average tile the model was trained on, or by the
question's own average tile when the model records no training statistics) to the real one. The gradient
flows through projector, pooling and the LongNet slide encoder, so a tile that LongNet mixed into every
visual token is credited where it is, not where its pooling bin sits. Each pass is one forward and one
backward of slide encoder and LLM over a batch of path points: on CPU every point in one pass (larger
matrix products, a fraction of the Python work per point) and, where it fits, plain matmul-softmax attention,
whose backward is faster there than the CPU flash kernel's; on CUDA one point per pass, with LongNet layers
and LLM decoder layers recomputed in the backward, so a whole slide fits beside a 7B model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from wsi_llava.errors import ModelError

if TYPE_CHECKING:
    from wsi_llava.model.wsi_llava import WSILlava

#: path steps (midpoint rule); the attributions of all tiles sum to the change in log-probability
#: between reference and slide, up to the integration error that more steps shrink
DEFAULT_STEPS = 8
METHOD = "integrated gradients of the answer's log-probability w.r.t. tile features"


def reference_features(model: WSILlava, features: torch.Tensor) -> torch.Tensor:
    """The path's start: the model's training-set mean tile feature, else the mean of ``features``."""
    from wsi_llava.features.feature_stats import model_feature_stats

    stats = model_feature_stats(model)
    if stats is not None and stats.dim == features.shape[1]:
        mean = torch.as_tensor(stats.mean, dtype=features.dtype, device=features.device)
    else:
        mean = features.mean(dim=0)
    return mean.expand_as(features)


def _decoder_layers(llm: nn.Module) -> list[nn.Module]:
    """The LLM's repeated blocks (the longest ModuleList), recomputed in the backward pass on CUDA."""
    lists = [m for m in llm.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


@contextlib.contextmanager
def _recompute(model: WSILlava, enable: bool) -> Iterator[None]:
    """Activation checkpointing of LongNet and LLM layers for the duration of the evidence pass."""
    if not enable:
        yield
        return
    from torch.utils.checkpoint import checkpoint

    encoder = getattr(getattr(model.slide_encoder, "longnet", None), "encoder", None)
    was = getattr(encoder, "grad_checkpointing", None)
    # a layer may already have an instance ``forward`` (e.g. accelerate's device-map hooks): keep it
    saved = [(layer, vars(layer).get("forward")) for layer in _decoder_layers(model.llm)]
    for layer, _ in saved:
        layer.forward = partial(checkpoint, layer.forward, use_reentrant=False)
    if encoder is not None:
        encoder.grad_checkpointing = True
    try:
        yield
    finally:
        for layer, own in saved:
            if own is None:
                del layer.forward  # back to the class's forward
            else:
                layer.forward = own
        if encoder is not None:
            encoder.grad_checkpointing = was


#: on CPU, the attention probabilities (fp32, every layer and path point) that the matmul-softmax path may keep
#: for the backward pass before the evidence pass keeps the LLM's own (memory-lean) attention instead
EAGER_ATTENTION_BYTES = 1 << 30


@contextlib.contextmanager
def _cpu_attention(llm: nn.Module, points: int, length: int) -> Iterator[None]:
    """On CPU, the LLM's plain matmul-softmax ("eager") attention for the gradient pass while what it keeps
    fits :data:`EAGER_ATTENTION_BYTES`: PyTorch's CPU flash-attention backward is slower than the matmul
    one at a slide's few hundred tokens. The pass runs on the thread that owns the model (the
    session's, or the server's batcher), so no answer decodes while it is switched."""
    cfg = getattr(llm, "config", None)
    current = getattr(cfg, "_attn_implementation", None)
    heads = getattr(cfg, "num_attention_heads", 0) or 0
    layers = getattr(cfg, "num_hidden_layers", 0) or 0
    kept = points * heads * layers * length * length * 4  # fp32 probabilities of every layer and point
    if (
        current in (None, "eager")
        or not hasattr(llm, "set_attn_implementation")
        or not 0 < kept <= EAGER_ATTENTION_BYTES
    ):
        yield
        return
    llm.set_attn_implementation("eager")
    try:
        yield
    finally:
        llm.set_attn_implementation(current)


def _answer_log_prob(
    model: WSILlava, ids: torch.Tensor, n_answer: int, features: torch.Tensor, coords: torch.Tensor, tile: int
) -> torch.Tensor:
    """Sum of the log-probabilities of the answer tokens (teacher-forced) given tile features ``(N, D)``,
    or summed over a batch of such slides ``(B, N, D)`` (one LLM pass for the whole batch)."""
    points = features[None] if features.dim() == 2 else features
    visual = torch.stack([model.slide_encoder(f, coords, tile) for f in points])
    s = model.embed(ids.expand(len(points), -1), visual)
    out = model.llm(
        inputs_embeds=s.inputs_embeds,
        attention_mask=s.attention_mask,
        position_ids=s.position_ids,
        use_cache=False,
        logits_to_keep=n_answer + 1,
    )
    logits = out.logits[:, -n_answer - 1 : -1].float()  # the position before each answer token predicts it
    answer = ids[0, -n_answer:].to(logits.device).expand(len(points), -1)
    return logits.log_softmax(-1).gather(-1, answer[..., None]).sum()


def tile_attributions(
    model: WSILlava,
    question: str,
    features: Any,
    coords: Any,
    tile_size_level0: int,
    answer_ids: Sequence[int] | torch.Tensor,
    *,
    steps: int = DEFAULT_STEPS,
    reference: Any | None = None,
    points_per_pass: int | None = None,
) -> np.ndarray:
    """Signed integrated gradient of each tile ``(N,)`` float64: its share of the change in the answer's
    log-probability between the reference slide (default :func:`reference_features`) and this one; the
    shares sum to that change. ``points_per_pass``: path points batched into one forward and backward
    (default: all of them on CPU, one on CUDA, where memory is what counts)."""
    if model.slide_encoder is None:
        raise ModelError(f"model {model.spec.name!r} has no slide encoder: evidence needs tile features")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    answer = [int(a) for a in (answer_ids.tolist() if torch.is_tensor(answer_ids) else answer_ids)]
    p = next(model.slide_encoder.parameters())
    x = torch.as_tensor(features).to(device=p.device, dtype=torch.float32)
    c = torch.as_tensor(coords).to(p.device)
    if not answer or x.shape[0] == 0:
        return np.zeros(x.shape[0])
    ids = torch.tensor([model.prompt(question).input_ids + answer], dtype=torch.long, device=model.device)
    ref = reference_features(model, x) if reference is None else torch.as_tensor(reference).to(x).expand_as(x)
    delta = x - ref
    total = torch.zeros_like(x)
    cuda = p.device.type == "cuda"
    per_pass = max(1, points_per_pass or (1 if cuda else steps))
    alphas = (torch.arange(steps, dtype=torch.float32, device=x.device) + 0.5) / steps  # midpoints
    length = ids.shape[1] - 1 + model.n_visual_tokens  # the LLM's sequence: <image> becomes the visual tokens
    attention = contextlib.nullcontext() if cuda else _cpu_attention(model.llm, per_pass, length)
    with torch.enable_grad(), _recompute(model, cuda), attention:
        for chunk in alphas.split(per_pass):
            points = (ref + chunk[:, None, None] * delta).to(p.dtype).requires_grad_(True)
            logp = _answer_log_prob(model, ids, len(answer), points, c, int(tile_size_level0))
            (grad,) = torch.autograd.grad(logp, points)
            total += grad.float().sum(dim=0)
    return (delta * total / steps).sum(dim=1).double().cpu().numpy()


def tile_relevance(
    model: WSILlava,
    question: str,
    features: Any,
    coords: Any,
    tile_size_level0: int,
    answer_ids: Sequence[int] | torch.Tensor,
    *,
    steps: int = DEFAULT_STEPS,
) -> np.ndarray:
    """Per-tile relevance ``(N,)`` float64 of ``answer_ids`` to ``question``, summing to 1.

    The positive part of :func:`tile_attributions` (tiles that made the answer more likely), normalised;
    uniform when no tile raised it. Deterministic for fixed inputs.
    """
    scores = tile_attributions(
        model, question, features, coords, tile_size_level0, answer_ids, steps=steps
    ).clip(min=0)
    n = len(scores)
    total = scores.sum()
    if n and (not np.isfinite(total) or total <= 0):
        return np.full(n, 1.0 / n)
    return scores / total if n else scores
