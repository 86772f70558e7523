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


#: prompts whose questions one LLM call prefills together at most (their K/V is held ``rows`` times)
MAX_ROWS = 8


@dataclass(eq=False)
class Prefilled:
    """One prompt's prefill: the spliced prompt, the K/V cache (row ``row`` is this prompt, up to its
    length), the logits of its last position (vocab,) and whether its prefix was cached."""

    spliced: Any
    cache: Any
    row: int
    logits: torch.Tensor
    hit: bool


@dataclass(eq=False)  # entries are compared by identity, never by their tensors
class _Entry:
    visual: torch.Tensor  # a copy of the visual tokens the prefix was computed from
    keys: list[torch.Tensor]  # per layer (1, kv_heads, length, head_dim)
    values: list[torch.Tensor]
    nbytes: int


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device == b.device and a.dtype == b.dtype and torch.equal(a, b)


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
        p = self.prefill_many(model, [(parts, vt)])[0]
        return p.spliced, p.cache, p.logits[None], p.hit

    def prefill_many(
        self, model: WSILlava, prompts: list[tuple[Any, torch.Tensor]], max_rows: int = MAX_ROWS
    ) -> list[Prefilled]:
        """:meth:`prefill` of several prompts ``(parts, visual tokens)`` at once: the questions of prompts
        sharing a prefix run as one batch (up to ``max_rows``, right-padded: a row's padding comes after
        its question, so causal attention keeps it out), which is how answers joining together start
        together. Each result's cache row holds its prompt up to its own length."""
        out: list[Prefilled | None] = [None] * len(prompts)
        groups: dict[int, tuple[_Entry, int, list[tuple[int, Any, bool]]]] = {}
        fresh: list[tuple[tuple, _Entry]] = []  # computed in this call (found again even if not stored)
        for i, (parts, vt) in enumerate(prompts):
            s = splice(model, parts, vt)
            ids = list(parts.input_ids)
            start = ids.index(IMAGE_TOKEN_INDEX) if ids.count(IMAGE_TOKEN_INDEX) == 1 else -1
            length = start + int(s.n_visual)
            if start < 0 or self.max_bytes <= 0 or length >= int(s.inputs_embeds.shape[1]):
                past, logits = prefill(model, s)  # no prefix to share (or nothing after it)
                out[i] = Prefilled(s, past, 0, logits[0], False)
                continue
            key = (tuple(ids[:start]), tuple(vt.shape), weights_key(model.llm))
            entry = self._find(key, vt)
            if entry is None:
                entry = next((e for k, e in fresh if k == key and _same(e.visual, vt)), None)
            hit = entry is not None
            if entry is None:
                entry = self._compute(model, s, vt, length)
                self._store(key, entry)
                fresh.append((key, entry))
                self.misses += 1
            else:
                self.hits += 1
            groups.setdefault(id(entry), (entry, length, []))[2].append((i, s, hit))
        step = max(1, int(max_rows))
        for entry, length, members in groups.values():
            for j in range(0, len(members), step):
                chunk = members[j : j + step]
                for (i, _s, _hit), p in zip(chunk, self._questions(model, entry, length, chunk), strict=True):
                    out[i] = p
        assert all(p is not None for p in out)
        return out  # type: ignore[return-value]

    def _questions(
        self, model: WSILlava, entry: _Entry, length: int, rows: list[tuple[int, Any, bool]]
    ) -> list[Prefilled]:
        """One LLM call on the question parts of ``rows`` (prompts sharing ``entry``'s prefix)."""
        lens = [int(s.inputs_embeds.shape[1]) - length for _, s, _ in rows]
        width, first = max(lens), rows[0][1]
        x = first.inputs_embeds.new_zeros((len(rows), width, first.inputs_embeds.shape[-1]))
        pos = torch.arange(length, length + width, device=x.device).repeat(len(rows), 1)
        for r, (_, s, _) in enumerate(rows):
            x[r, : lens[r]] = s.inputs_embeds[0, length:]
            pos[r, : lens[r]] = s.position_ids[0, length:]
        keep = sorted({n - 1 for n in lens})  # the positions whose logits are wanted
        res = model.llm(
            inputs_embeds=x,
            attention_mask=torch.ones(
                (len(rows), length + width), dtype=first.attention_mask.dtype, device=x.device
            ),
            position_ids=pos,
            use_cache=True,
            logits_to_keep=torch.tensor(keep, device=x.device),
            **{cache_arg(model): self._cache(model, entry, len(rows))},
        )
        cache = cache_of(res)
        return [
            Prefilled(s, cache, r, res.logits[r, keep.index(lens[r] - 1)], hit)
            for r, (_i, s, hit) in enumerate(rows)
        ]

    # --- entries ----------------------------------------------------------------------------------
    def _find(self, key: tuple, vt: torch.Tensor) -> _Entry | None:
        group = self._entries.get(key)
        if not group:
            return None
        for i, e in enumerate(group):
            if _same(e.visual, vt):
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
    def _cache(model: WSILlava, entry: _Entry, rows: int = 1) -> Any:
        """A fresh Hugging Face cache holding the prefix ``rows`` times (the entry's tensors are never
        written: a dynamic cache concatenates new positions into new tensors)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=model.llm.config)
        for i, (k, v) in enumerate(zip(entry.keys, entry.values, strict=True)):
            cache.update(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1), i)
        return cache
