"""Prompt-prefix K/V reuse: questions about the same selection prefill only their own words.

A WSI-LLaVA prompt is the template text up to the image, the visual tokens of the selection, then the
question. Everyone asking about one slide (or one region) shares the first two parts, which are most of
the prompt (576 visual tokens against a few dozen of text). :class:`PrefixCache` keeps the K/V of recent
prefixes; :meth:`PrefixCache.prefill` runs the LLM on the prefix only when it has not seen it, then on the
question with the prefix's K/V as the past, as serving engines do with prefix caching. A prefix is known
by the LLM's weights, its text ids and the visual tokens' values (compared exactly, against a stored copy:
callers hand in new tensor objects for the same selection). Entries are bounded in bytes, least recently
used first out. Not thread-safe: one owner (the batcher's loop thread) calls it.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from wsi_llava.model.fast_decode import cache_kv, weights_key
from wsi_llava.model.generation import cache_arg, cache_of, prefill, splice
from wsi_llava.model.templates import IMAGE_TOKEN_INDEX

if TYPE_CHECKING:
    from wsi_llava.model.wsi_llava import WSILlava

logger = logging.getLogger(__name__)

#: K/V bytes kept at most (a 7B LLM's prefix of 576 visual tokens is about 0.3 GB)
DEFAULT_MAX_BYTES = 2 << 30


@dataclass(eq=False)  # entries are compared by identity, never by their tensors
class _Entry:
    visual: torch.Tensor  # a copy of the visual tokens the prefix was computed from
    keys: list[torch.Tensor]  # per layer (1, kv_heads, length, head_dim)
    values: list[torch.Tensor]
    nbytes: int


class PrefixCache:
    """K/V of recent prompt prefixes of one LLM (see the module docstring)."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[tuple, list[_Entry]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for group in self._entries.values() for e in group)

    def clear(self) -> None:
        self._entries.clear()

    def prefill(self, model: WSILlava, parts: Any, vt: torch.Tensor) -> tuple[Any, Any, torch.Tensor, bool]:
        """``(spliced prompt, K/V cache, last position's logits, whether the prefix was cached)`` of a
        prompt; the cache and logits are those of :func:`~wsi_llava.model.generation.prefill` on the
        whole prompt (computed in two parts, so equal up to float rounding)."""
        s = splice(model, parts, vt)
        ids = list(parts.input_ids)
        if ids.count(IMAGE_TOKEN_INDEX) != 1 or self.max_bytes <= 0:
            past, logits = prefill(model, s)
            return s, past, logits, False
        start = ids.index(IMAGE_TOKEN_INDEX)
        length = start + int(s.n_visual)
        if length >= int(s.inputs_embeds.shape[1]):  # nothing after the image: no question to prefill apart
            past, logits = prefill(model, s)
            return s, past, logits, False
        key = (tuple(ids[:start]), tuple(vt.shape), weights_key(model.llm))
        entry = self._find(key, vt)
        hit = entry is not None
        if entry is None:
            entry = self._compute(model, s, vt, length)
            self._store(key, entry)
            self.misses += 1
        else:
            self.hits += 1
        past = self._cache(model, entry)
        out = model.llm(
            inputs_embeds=s.inputs_embeds[:, length:],
            attention_mask=s.attention_mask,
            position_ids=s.position_ids[:, length:],
            use_cache=True,
            logits_to_keep=1,
            **{cache_arg(model): past},
        )
        return s, cache_of(out), out.logits[:, -1, :], hit

    # --- entries ----------------------------------------------------------------------------------
    def _find(self, key: tuple, vt: torch.Tensor) -> _Entry | None:
        group = self._entries.get(key)
        if not group:
            return None
        for i, e in enumerate(group):
            if e.visual.device == vt.device and e.visual.dtype == vt.dtype and torch.equal(e.visual, vt):
                self._entries.move_to_end(key)
                group.append(group.pop(i))
                return e
        return None

    def _compute(self, model: WSILlava, s: Any, vt: torch.Tensor, length: int) -> _Entry:
        out = model.llm(
            inputs_embeds=s.inputs_embeds[:, :length],
            attention_mask=s.attention_mask[:, :length],
            position_ids=s.position_ids[:, :length],
            use_cache=True,
            logits_to_keep=1,
        )
        cache = cache_of(out)
        n_layers = int(model.llm.config.get_text_config().num_hidden_layers)
        keys, values = [], []
        for i in range(n_layers):
            k, v = cache_kv(cache, i)
            keys.append(k[:, :, :length])
            values.append(v[:, :, :length])
        nbytes = sum(t.numel() * t.element_size() for t in (*keys, *values))
        return _Entry(vt.detach().clone(), keys, values, nbytes)

    def _store(self, key: tuple, entry: _Entry) -> None:
        if entry.nbytes > self.max_bytes:
            return
        self._entries.setdefault(key, []).append(entry)
        self._entries.move_to_end(key)
        while self.nbytes > self.max_bytes:
            oldest_key = next(iter(self._entries))
            group = self._entries[oldest_key]
            group.pop(0)
            if not group:
                del self._entries[oldest_key]

    @staticmethod
    def _cache(model: WSILlava, entry: _Entry) -> Any:
        """A fresh Hugging Face cache holding the prefix (the entry's tensors are never written: a
        dynamic cache concatenates new positions into new tensors)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=model.llm.config)
        for i, (k, v) in enumerate(zip(entry.keys, entry.values, strict=True)):
            cache.update(k, v, i)
        return cache
