"""Evidence: how much each visual token (and so each pooling bin of tiles) weighed on an answer.

Kept apart from the model class: it reads a finished answer back through the LLM once with eager
attention and hooks, which is analysis, not generation. The session spreads the bin scores over tiles
(:func:`wsi_llava.slide_encoder.pooling.bin_to_tile_scores`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn

from wsi_llava.errors import ModelError

if TYPE_CHECKING:
    from wsi_llava.model.wsi_llava import WSILlava


@torch.inference_mode()
def visual_relevance(
    model: WSILlava,
    question: str,
    visual_tokens: torch.Tensor,
    answer_ids: Sequence[int] | torch.Tensor,
    *,
    layers: Literal["last_half", "all"] = "last_half",
) -> np.ndarray:
    """Attention from the answer-producing positions to each visual token, normalised to sum 1.

    One eager-attention forward pass over prompt + answer; heads and layers (default: the last
    half) are averaged. Each layer's attention is reduced to the rows and columns needed as soon as
    it is computed (a forward hook), so no more than one layer's attention is held at a time: a 7B
    model's full set would not fit beside it on a small card. Returns ``(n_vis,)`` float64.
    """
    parts = model.prompt(question)
    answer = [int(a) for a in (answer_ids.tolist() if torch.is_tensor(answer_ids) else answer_ids)]
    ids = torch.tensor([parts.input_ids + answer], dtype=torch.long)
    vt = torch.as_tensor(visual_tokens)
    s = model.embed(ids, vt if vt.dim() == 3 else vt[None])
    start, n_vis = int(s.image_starts[0]), s.n_visual
    prompt_end = len(parts.input_ids) - 1 + n_vis  # positions of the expanded prompt
    # the position before each answer token is the one that produced it
    queries = list(range(prompt_end - 1, prompt_end - 1 + max(1, len(answer))))
    target = model.llm.get_base_model() if hasattr(model.llm, "get_base_model") else model.llm
    attn = [m for name, m in target.named_modules() if name.endswith("self_attn")]
    if not attn:
        raise ModelError(f"{type(target).__name__} has no self_attn modules; cannot compute evidence")
    chosen = attn[len(attn) // 2 :] if layers == "last_half" else attn
    q = torch.tensor(queries, device=s.inputs_embeds.device)
    acc = torch.zeros(n_vis, dtype=torch.float64, device=s.inputs_embeds.device)
    seen = [0]

    def reduce(_module: nn.Module, _args: Any, output: Any) -> Any:
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            return output
        acc.add_(weights[0][:, q, start : start + n_vis].double().mean(dim=0).sum(dim=0))
        seen[0] += 1
        return (output[0], None, *output[2:])

    previous = getattr(target.config, "_attn_implementation", None)
    switched = previous not in (None, "eager") and hasattr(target, "set_attn_implementation")
    if switched:
        target.set_attn_implementation("eager")
    hooks = [m.register_forward_hook(reduce) for m in chosen]
    try:
        model.llm(
            inputs_embeds=s.inputs_embeds,
            attention_mask=s.attention_mask,
            position_ids=s.position_ids,
            use_cache=False,
            logits_to_keep=1,
        )
    finally:
        for h in hooks:
            h.remove()
        if switched:
            target.set_attn_implementation(previous)
    if seen[0] == 0:
        raise ModelError(f"{type(target).__name__} returned no attention weights; cannot compute evidence")
    scores = acc.cpu().numpy()
    total = scores.sum()
    if not np.isfinite(total) or total <= 0:
        return np.full(n_vis, 1.0 / n_vis)
    return scores / total
