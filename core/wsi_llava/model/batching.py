"""Continuous batching of answers for one ``WSILlava``: concurrent questions decode together.

A loop thread owns every LLM call. Each turn it runs the queued :meth:`Batcher.call` functions, drops
cancelled streams, prefills the requests that fit (eagerly with the Hugging Face model; the K/V of a
prompt's prefix, the text up to the image and the selection's visual tokens, is computed once for
everyone asking about that selection: :class:`~wsi_llava.model.prefix_cache.PrefixCache`, so each answer
prefills only its question, and the questions of answers joining in one turn run as one batch) and copies their K/V into a slot of static buffers ``[slots, kv_heads, capacity, head_dim]`` per layer, chooses one token
for every active answer (the per-token rules of :class:`~wsi_llava.model.generation.AnswerState`, shared
with ``stream``), and runs one decode step for all of them at once, each row at its own position behind
its own key mask. Active answers stay compacted in slots ``0..b-1`` (one that leaves is replaced by the
last), so a step works on views of ``[:b]``. On CUDA in the ``graph``/``compile`` modes of
``resolve_mode(model.fast_decode, ...)`` the step is captured once per batch-size bucket (1, 2, 4, ..., 64;
padded with masked dummy rows) and replayed (``compile`` captures the same uncompiled step): every bucket
up to ``max_batch`` by :meth:`Batcher.warm`, which a server runs before it listens, else when first needed,
and again after the buffers grow (a longer answer than they hold, or more answers); otherwise,
``off`` included, and after a failed capture, it runs eagerly (``decode_path`` ``batched-graph`` or
``batched``). Answers equal ``stream``'s alone: the step's logits match the single-stream step's to float
rounding, and each answer keeps its own seeded sampling generator (in bf16, as with the single-stream fast
step, a near-tie can pick another token).

Models the fast decoder does not support (peft-wrapped, other architectures, ...) still batch their
admission: the loop then advances each active answer with its own eager Hugging Face step, round-robin,
one token each per turn (``decode_path`` ``eager``); joining, leaving and cancelling work the same way.

Imported only by the server (it imports torch at the top); ``import wsi_llava`` stays torch-free.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.nn.functional as F

from wsi_llava.errors import ModelError
from wsi_llava.model import fast_decode
from wsi_llava.model.fast_decode import (
    DecoderParts,
    UnsupportedModel,
    _layer_in,
    _layer_out,
    _rms,
    cache_kv,
    resolve_mode,
    weights_key,
)
from wsi_llava.model.generation import (
    AnswerState,
    CancelLike,
    GenerationResult,
    cache_arg,
    cache_of,
    checked_request,
    is_cancelled,
    warm_length,
)
from wsi_llava.model.prefix_cache import Prefilled, PrefixCache

if TYPE_CHECKING:
    from wsi_llava.model.wsi_llava import WSILlava

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: batch sizes a CUDA graph is captured for; a batch runs in the smallest bucket that holds it
BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def bucket(n: int) -> int:
    """The smallest bucket holding ``n`` rows (beyond the largest: the next multiple of it)."""
    for b in BUCKETS:
        if n <= b:
            return b
    return -(-n // BUCKETS[-1]) * BUCKETS[-1]


def warm_slots(max_batch: int, per_slot: int, free: int) -> int:
    """Slots to allocate up front for ``max_batch`` answers of ``per_slot`` KV bytes each: the bucket
    holding them, or the largest smaller bucket whose buffers take at most half of ``free`` bytes (1 at least)."""
    slots = bucket(max_batch)
    while slots > 1 and slots * per_slot > free // 2:
        slots = max(b for b in BUCKETS if b < slots) if slots <= BUCKETS[-1] else slots - BUCKETS[-1]
    return slots


class BatchDecoder(DecoderParts):
    """Static KV buffers of several answers and their one-token decode step, against the LLM's weights.

    ``load(slot, cache, length)`` takes an eager prefill's cache; ``step(tokens, positions)`` feeds
    ``tokens[i]`` at ``positions[i]`` to slot ``i`` (``0..b-1``) and returns logits (b, vocab), a buffer
    the next step may overwrite. Raises ``UnsupportedModel`` for LLMs the fast decoder cannot run.
    ``pad`` (default: with graphs) runs every step on a whole bucket, the rows past ``b`` masked dummies.
    """

    def __init__(self, llm: Any, use_graphs: bool = False, pad: bool | None = None) -> None:
        super().__init__(llm)
        self.use_graphs = bool(use_graphs) and self.device.type == "cuda"
        self.pad = self.use_graphs if pad is None else bool(pad)
        self.slots = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self._graphs: dict[int, tuple[Any, torch.Tensor]] = {}

    # --- buffers -----------------------------------------------------------------------------------
    def ensure(self, slots: int, length: int) -> None:
        """Room for ``slots`` rows of ``length`` positions; growing keeps what the rows hold and drops
        the captured graphs (they hold the old buffers' addresses)."""
        if slots <= self.slots and length <= self.capacity:
            return
        n_slots = max(self.slots, bucket(slots))
        cap = self.capacity_for(length)
        self._graphs.clear()
        shape = (n_slots, self.n_kv, cap, self.head_dim)
        for bufs in (self.k, self.v):
            for i in range(len(self.layers)):
                new = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if i < len(bufs):
                    new[: self.slots, :, : self.capacity].copy_(bufs[i])
                    bufs[i] = new  # the old one is freed here, one layer at a time
                else:
                    bufs.append(new)
        positions = torch.arange(cap, device=self.device)[None]
        probe = torch.zeros((1, 1, 1), dtype=self.dtype, device=self.device)
        cos, sin = self.rotary(probe, position_ids=positions)  # the model's own rotary tables
        self._cos, self._sin = cos[0].contiguous(), sin[0].contiguous()  # (cap, head_dim)
        self._arange = torch.arange(cap, device=self.device)
        self._neg_inf = torch.full((1, cap), float("-inf"), dtype=self.dtype, device=self.device)
        self._tok = torch.zeros((n_slots, 1), dtype=torch.long, device=self.device)
        self._pos = torch.zeros((n_slots,), dtype=torch.long, device=self.device)
        self.slots, self.capacity = n_slots, cap
        logger.debug("batched decode: KV buffers for %d slots x %d positions", n_slots, cap)

    def capacity_for(self, length: int) -> int:
        """Positions the buffers hold once they have room for ``length`` (grown in whole steps)."""
        step = fast_decode.CAPACITY_STEP
        return max(self.capacity, -(-int(length) // step) * step)

    def slot_bytes(self, capacity: int) -> int:
        """K/V bytes of one slot of ``capacity`` positions over every layer."""
        return 2 * len(self.layers) * self.n_kv * capacity * self.head_dim * self.embed_w.element_size()

    def load(self, slot: int, cache: Any, length: int, row: int = 0) -> None:
        """Copy the first ``length`` positions of row ``row`` of every layer of a Hugging Face cache into ``slot``."""
        self.ensure(slot + 1, length + 1)
        for i in range(len(self.layers)):
            k, v = cache_kv(cache, i)
            if row >= k.shape[0] or k.shape[1] != self.n_kv or k.shape[-1] != self.head_dim:
                raise ModelError(
                    f"prefill cache layer {i} has shape {tuple(k.shape)}: no row {row} of this LLM's K/V"
                )
            self.k[i][slot, :, :length].copy_(k[row, :, :length])
            self.v[i][slot, :, :length].copy_(v[row, :, :length])

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of slot ``src`` into slot ``dst``."""
        for bufs in (self.k, self.v):
            for buf in bufs:
                buf[dst, :, :length].copy_(buf[src, :, :length])

    # --- the step ----------------------------------------------------------------------------------
    def _forward(self, b: int) -> torch.Tensor:
        """Rows ``0..b-1`` through every layer; reads ``_tok`` / ``_pos``, writes K/V at each row's position."""
        tok, pos = self._tok[:b], self._pos[:b]
        x = F.embedding(tok, self.embed_w)  # (b, 1, hidden)
        cos = self._cos.index_select(0, pos).view(b, 1, 1, -1)
        sin = self._sin.index_select(0, pos).view(b, 1, 1, -1)
        # additive key mask per row, built once per step for all layers: 0 up to its position, -inf after
        keep = self._arange[None] <= pos[:, None]
        mask = self._neg_inf.expand(b, -1).masked_fill(keep, 0.0).view(b, 1, 1, -1)
        where = pos.view(b, 1, 1, 1).expand(b, self.n_kv, 1, self.head_dim)
        for i, ly in enumerate(self.layers):
            q, k, v = _layer_in(
                x, ly.ln1, ly.eps1, ly.wq, ly.bq, ly.wk, ly.bk, ly.wv, ly.bv, cos, sin, self.head_dim
            )
            kc, vc = self.k[i][:b], self.v[i][:b]
            kc.scatter_(2, where, k)
            vc.scatter_(2, where, v)
            x = _layer_out(
                x, q, kc, vc, mask, self.scaling, ly.wo, ly.bo,
                ly.ln2, ly.eps2, ly.wg, ly.bg, ly.wu, ly.bu, ly.wd, ly.bd,
            )  # fmt: skip
        return F.linear(_rms(x, self.norm_w, self.norm_eps), self.head_w, self.head_b)[:, -1, :]

    def _capture(self, b: int) -> tuple[Any, torch.Tensor]:
        """Warm the step for ``b`` rows up on a side stream, then capture it (the inputs are the step's
        own: the warm-up rewrites the K/V it is about to write with the same values)."""
        t0 = time.perf_counter()
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(b)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread-local: work of other threads on this card (featurizing a slide) cannot spoil the capture
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = self._forward(b)
        self.capture_seconds += time.perf_counter() - t0
        logger.info("batched decode: captured the step for %d rows in %.2f s", b, time.perf_counter() - t0)
        return graph, out

    def capture_buckets(self, rows: int) -> list[int]:
        """Capture the step of every bucket up to ``rows`` not captured yet (the buffers must hold no
        answer: a capture writes K/V at position 0 of its rows); the buckets captured now."""
        done = []
        for b in sorted({*(b for b in BUCKETS if b <= rows), bucket(rows)}):
            if b > self.slots or b in self._graphs:
                continue
            self._tok[:b].zero_()
            self._pos[:b].zero_()
            self._graphs[b] = self._capture(b)
            done.append(b)
        return done

    def step(self, tokens: list[int], positions: list[int]) -> tuple[torch.Tensor, bool]:
        """Logits (b, vocab) after feeding ``tokens[i]`` at ``positions[i]`` to slot ``i``, and whether a
        CUDA graph ran the step (a capture failure turns graphs off, with one warning)."""
        b = len(tokens)
        if b == 0 or b > self.slots:
            raise ModelError(f"batched decode: {b} rows for {self.slots} slots")
        if max(positions) >= self.capacity:
            raise ModelError(f"batched decode: position {max(positions)} beyond the {self.capacity} buffered")
        rows = bucket(b) if self.use_graphs or self.pad else b
        pad = rows - b  # dummy rows: token 0 at position 0 of free slots, never read
        self._tok[:rows, 0].copy_(torch.tensor(tokens + [0] * pad, dtype=torch.long))
        self._pos[:rows].copy_(torch.tensor(positions + [0] * pad, dtype=torch.long))
        if self.use_graphs:
            entry = self._graphs.get(rows)
            if entry is None:
                try:
                    entry = self._graphs[rows] = self._capture(rows)
                except Exception as e:
                    logger.warning(
                        "batched decode: CUDA graph capture failed (%s: %s); stepping eagerly",
                        type(e).__name__,
                        e,
                    )
                    self.use_graphs = self.pad = False
                    self._graphs.clear()
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    entry = None
            if entry is not None:
                entry[0].replay()
                return entry[1][:b], True
        return self._forward(rows)[:b], False


class BatchedStream:
    """The text chunks of one answer of a :class:`Batcher`, as an iterator consumed by any one thread.

    ``result`` is set when the stream has ended (same fields as ``WSILlava.last_generation``).
    """

    def __init__(self, batcher: Batcher, cancel: CancelLike) -> None:
        self._batcher = batcher
        self._external = cancel
        self._cancelled = threading.Event()
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._over = False
        self.result: GenerationResult | None = None

    def __iter__(self) -> BatchedStream:
        return self

    def __next__(self) -> str:
        """The next chunk (blocks until it is decoded); StopIteration at the end; re-raises a loop error."""
        if self._over:
            raise StopIteration
        kind, value = self._queue.get()
        if kind == "chunk":
            return value
        self._over = True
        if kind == "error":
            raise value
        raise StopIteration

    def cancel(self) -> None:
        """Stop this answer: its slot is freed before the next step; ``result.stop_reason`` is ``cancelled``."""
        self._cancelled.set()
        self._batcher._wake()

    def _wants_stop(self) -> bool:
        return self._cancelled.is_set() or is_cancelled(self._external)


class _Request:
    """A submitted answer and the loop's state for it."""

    def __init__(self, stream: BatchedStream, parts: Any, gen: Any, vt: torch.Tensor, seed: int | None):
        self.stream, self.parts, self.gen, self.vt, self.seed = stream, parts, gen, vt, seed
        self.result = GenerationResult(
            prompt_len=len(parts.input_ids) - 1 + vt.shape[0], n_visual_tokens=vt.shape[0]
        )
        self.ans: AnswerState | None = None
        self.logits: torch.Tensor | None = None  # (vocab,) for the next token
        self.greedy: int | None = None  # its argmax, when the step computed it for all rows at once
        self.row: int | None = None  # its row in the last step's logits
        self.tok: int | None = None
        self.cur_len = 0  # positions held; the next token goes at this position
        self.past: Any = None  # the Hugging Face cache (round-robin fallback only)
        self.t1 = 0.0
        self.failed = False

    def put(self, kind: str, value: Any = None) -> None:
        self.stream._queue.put((kind, value))


class Batcher:
    """Continuous batching for one WSILlava: a loop thread owns every LLM call; requests join and leave
    the decode batch between steps (see the module docstring)."""

    def __init__(self, model: WSILlava, max_batch: int = 16) -> None:
        if int(max_batch) < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model
        self.max_batch = int(max_batch)
        self._cv = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()
        self._active: list[_Request] = []  # slot i holds _active[i]; changed by the loop thread only
        self._joining = 0  # taken from _waiting, being prefilled
        self._closed = False
        self._dec: BatchDecoder | None = None
        self._dec_key: tuple | None = None
        self._out: torch.Tensor | None = None  # the last step's logits, rows of _Request.row
        self.prefixes = PrefixCache()  # K/V of the selections asked about lately (loop thread only)
        self._thread = threading.Thread(target=self._loop, name="wsi-batcher", daemon=True)
        self._thread.start()

    # --- the public side ----------------------------------------------------------------------------
    def submit(
        self,
        question: str,
        visual_tokens: torch.Tensor,
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        no_repeat_ngram_size: int | None = None,
        seed: int | None = None,
        cancel: CancelLike = None,
    ) -> BatchedStream:
        """Queue an answer (arguments as ``WSILlava.stream``); invalid requests raise here, at once."""
        vt, parts, gen = checked_request(
            self.model,
            question,
            visual_tokens,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            no_repeat_ngram_size=no_repeat_ngram_size,
        )
        stream = BatchedStream(self, cancel)
        req = _Request(stream, parts, gen, vt, seed)
        with self._cv:
            if self._closed:
                raise ModelError("the answer batcher is closed")
            self._waiting.append(req)
            self._cv.notify_all()
        return stream

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in the loop thread between decode steps (decoding pauses); its result or its error."""
        if threading.current_thread() is self._thread:
            return fn()
        fut: Future = Future()
        with self._cv:
            if self._closed:
                raise ModelError("the answer batcher is closed")
            self._calls.append((fn, fut))
            self._cv.notify_all()
        return fut.result()

    def close(self) -> None:
        """Stop the loop (idempotent); answers still running end with stop_reason ``cancelled``."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def __enter__(self) -> Batcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def active(self) -> int:
        """Answers in the decode batch now."""
        return len(self._active)

    @property
    def waiting(self) -> int:
        """Answers submitted and not yet prefilled."""
        with self._cv:
            return len(self._waiting) + self._joining

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def warm(self, length: int | None = None) -> dict[str, Any] | None:
        """Allocate the KV buffers of ``max_batch`` answers and capture every bucket's decode step now, so
        that answers joining later never wait for a capture (a server calls this before it listens).

        Only where steps run as CUDA graphs. ``length``: positions per answer (default: the visual
        tokens, 128 text tokens and the model's ``max_new_tokens``). The buffers take at most half the
        card's free memory: fewer slots are warmed when they would not fit (the rest grow on demand).
        What was prepared, or None when there is nothing to warm.
        """
        return self.call(lambda: self._warm(length))

    def _warm(self, length: int | None) -> dict[str, Any] | None:
        model = self.model
        model.wait_fast_decode()
        dec = self._decoder()
        if dec is None or not dec.use_graphs or self._active:
            return None
        t0 = time.perf_counter()
        length = int(length) if length is not None else warm_length(model)
        context = model.context_length()
        cap = dec.capacity_for(min(length, context) if context else length)
        per_slot = dec.slot_bytes(cap)
        slots = warm_slots(self.max_batch, per_slot, torch.cuda.mem_get_info(dec.device)[0])
        if slots < bucket(self.max_batch):
            logger.info(
                "answer batcher: KV buffers for %d of %d answers fit half the free memory; more grow on demand",
                slots,
                self.max_batch,
            )
        with torch.inference_mode():
            dec.ensure(slots, cap)
            captured = dec.capture_buckets(slots)
        torch.cuda.synchronize(dec.device)
        info = {
            "slots": dec.slots,
            "positions": dec.capacity,
            "buckets": captured,
            "kv_bytes": dec.slots * per_slot,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        logger.info(
            "answer batcher warm: %d slots x %d positions (%.1f GiB), steps captured for %s in %.1f s",
            info["slots"],
            info["positions"],
            info["kv_bytes"] / 2**30,
            captured,
            info["seconds"],
        )
        return info

    # --- the loop ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        model = self.model
        if model.device.type == "cuda":
            torch.cuda.set_device(model.device)
        while True:
            with self._cv:
                while not (self._closed or self._waiting or self._calls or self._active):
                    self._cv.wait()
                if self._closed:
                    break
                calls = list(self._calls)
                self._calls.clear()
            for fn, fut in calls:
                if not fut.set_running_or_notify_cancel():
                    continue
                try:
                    fut.set_result(fn())
                except Exception as e:
                    fut.set_exception(e)
            try:
                with torch.inference_mode():
                    self._turn()
            except Exception as e:  # not tied to one answer: every active answer fails with it
                logger.exception("answer batcher: a decode turn failed")
                for r in list(self._active):
                    self._fail(r, e)
                self._active.clear()
                self._out = None
        self._shutdown()

    def _shutdown(self) -> None:
        with self._cv:
            waiting, calls = list(self._waiting), list(self._calls)
            self._waiting.clear()
            self._calls.clear()
        for _fn, fut in calls:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(ModelError("the answer batcher is closed"))
        for r in [*self._active, *waiting]:
            if r.ans is None:
                r.result.stop_reason = "cancelled"
                r.stream.result = r.result
                r.put("end")
            else:
                r.ans.cancel()
                self._end(r)
        self._active.clear()
        self._dec = None
        self._out = None
        self.prefixes.clear()

    def _decoder(self) -> BatchDecoder | None:
        """The batched decoder for the model's current weights and mode; None: round-robin eager steps."""
        model = self.model
        key = (resolve_mode(model.fast_decode, model.device.type), *weights_key(model.llm))
        if self._dec_key != key:
            self._dec = None
            try:
                self._dec = BatchDecoder(model.llm, use_graphs=key[0] in ("graph", "compile"))
            except UnsupportedModel as e:
                logger.warning("batched decoding is off for this model (%s): stepping answers one by one", e)
            self._dec_key = key
        return self._dec

    def _turn(self) -> None:
        """Admit, choose one token for every active answer, then one decode step for those going on."""
        with self._cv:
            for r in list(self._waiting):
                try:
                    stop = r.stream._wants_stop()
                except Exception as e:  # a cancel callable that raises fails its own answer
                    self._waiting.remove(r)
                    self._fail(r, e)
                    continue
                if stop:
                    self._waiting.remove(r)
                    r.result.stop_reason = "cancelled"
                    r.stream.result = r.result
                    r.put("end")
            joiners = []
            while self._waiting and len(self._active) + len(joiners) < self.max_batch:
                joiners.append(self._waiting.popleft())
            self._joining = len(joiners)  # still counted as waiting until prefilled
        if joiners:
            self.model.wait_fast_decode()  # a warm-up thread in flight uses the LLM
            if not self._active:
                self._decoder()  # weights or mode may have changed while the batch was empty
            t_join, hits = time.perf_counter(), self.prefixes.hits
            together = self._prefill_together(joiners) if self._dec is not None and len(joiners) > 1 else None
            for r, done in zip(joiners, together or [None] * len(joiners), strict=True):
                try:
                    self._prefill(r, done)
                except Exception as e:
                    self._fail(r, e)
                    with self._cv:
                        self._joining -= 1
            logger.debug(  # where a joining answer's time to first token goes
                "batcher: %d joined in %.3f s (prefix hits %d), %d active",
                len(joiners),
                time.perf_counter() - t_join,
                self.prefixes.hits - hits,
                len(self._active),
            )

        # one token for every active answer (the previous step's argmax of all rows at once)
        if self._out is not None and any(r.row is not None for r in self._active):
            argmax = self._out.argmax(-1).tolist()
            for r in self._active:
                r.greedy = argmax[r.row] if r.row is not None else None
        self._out = None
        ended, last, going = [], [], []
        for r in self._active:
            assert r.ans is not None
            try:
                if r.stream._wants_stop():
                    r.ans.cancel()
                    ended.append(r)
                    continue
                r.tok = r.ans.choose(r.logits, r.greedy)
            except Exception as e:
                self._fail(r, e)
                ended.append(r)
                continue
            (ended if r.tok is None else going if r.ans.wants_more else last).append(r)
        for r in ended + last:
            self._leave(r)
        going = list(self._active)  # in slot order: leaving moved answers into the freed slots
        if going:
            self._step(going)
        for r in going + last:
            if r.failed:
                continue
            try:
                chunk = r.ans.chunk()
                if chunk:
                    r.result.text = r.ans.text[: r.ans.emitted]
                    r.put("chunk", chunk)
            except Exception as e:
                self._fail(r, e)
                if r in self._active:
                    self._leave(r)
                continue
            if r.ans.done and r in self._active:
                self._leave(r)  # a stop string: its row of the step just run is not read
        for r in ended + last + going:
            if r.ans.done and r.stream.result is None and not r.failed:
                self._end(r)

    def _prefill_together(self, joiners: list[_Request]) -> list[tuple[Prefilled, float]] | None:
        """The joiners' prompts prefilled in one go (:meth:`PrefixCache.prefill_many`), in their order, each
        with the seconds it took; None when that failed (each is then prefilled alone, failing alone)."""
        t0 = time.perf_counter()
        try:
            done = self.prefixes.prefill_many(self.model, [(r.parts, r.vt) for r in joiners])
        except Exception as e:
            logger.warning(
                "prefilling %d answers together failed (%s: %s)", len(joiners), type(e).__name__, e
            )
            return None
        seconds = time.perf_counter() - t0
        return [(p, seconds) for p in done]

    def _prefill(self, r: _Request, done: tuple[Prefilled, float] | None = None) -> None:
        """Prefill ``r`` (or take its part of a joint prefill) and move it into the next free slot."""
        model = self.model
        r.ans = AnswerState(model, r.parts, r.gen, r.seed)
        t0 = time.perf_counter()
        if done is None:
            p = self.prefixes.prefill_many(model, [(r.parts, r.vt)])[0]
        else:
            p, seconds = done
            t0 -= seconds
        s, past = p.spliced, p.cache
        n = int(s.inputs_embeds.shape[1])
        r.result = GenerationResult(prompt_len=n, n_visual_tokens=s.n_visual)
        r.logits, r.greedy, r.row, r.cur_len = p.logits, None, None, n
        dec = self._dec
        if dec is not None:
            dec.ensure(len(self._active) + 1, n + r.ans.max_new)
            dec.load(len(self._active), past, n, p.row)
            r.result.decode_path = "batched-graph" if dec.use_graphs else "batched"
        else:
            r.past = past
            r.result.decode_path = "eager"
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        r.result.prefill_seconds = time.perf_counter() - t0
        r.t1 = time.perf_counter()
        with self._cv:
            self._active.append(r)
            self._joining -= 1

    def _step(self, going: list[_Request]) -> None:
        """One decode step for ``going`` (all the active answers, slots ``0..b-1``, in slot order)."""
        dec = self._dec
        if dec is not None:
            try:
                out, graphed = dec.step([r.tok for r in going], [r.cur_len for r in going])
            except Exception as e:
                for r in going:
                    self._fail(r, e)
                for r in list(going):
                    self._leave(r)
                return
            self._out = out
            for i, r in enumerate(going):
                r.logits, r.row, r.greedy = out[i], i, None
                r.cur_len += 1
                r.result.decode_path = "batched-graph" if graphed else "batched"
            return
        model = self.model
        name = cache_arg(model)
        for r in going:  # round-robin: each answer its own eager Hugging Face step
            try:
                out = model.llm(
                    input_ids=torch.tensor([[r.tok]], device=model.device),
                    attention_mask=torch.ones((1, r.cur_len + 1), dtype=torch.long, device=model.device),
                    use_cache=True,
                    **{name: r.past},
                )
            except Exception as e:
                self._fail(r, e)
                self._leave(r)
                continue
            r.past = cache_of(out)
            r.logits, r.row, r.greedy = out.logits[0, -1], None, None
            r.cur_len += 1

    def _leave(self, r: _Request) -> None:
        """Free ``r``'s slot: the last active answer moves into it, so slots stay ``0..b-1``."""
        i = self._active.index(r)
        tail = self._active[-1]
        if tail is not r:
            if self._dec is not None:
                self._dec.move(len(self._active) - 1, i, tail.cur_len)
            self._active[i] = tail
        self._active.pop()
        r.past = None

    def _end(self, r: _Request) -> None:
        assert r.ans is not None
        tail = r.ans.tail()
        if tail:
            r.put("chunk", tail)
        r.result.decode_seconds = time.perf_counter() - r.t1
        r.ans.fill(r.result)
        r.stream.result = r.result
        r.put("end")

    def _fail(self, r: _Request, err: BaseException) -> None:
        if r.failed:
            return
        r.failed = True
        if r.ans is not None and r.t1:
            r.result.decode_seconds = time.perf_counter() - r.t1
            r.ans.fill(r.result)
        r.stream.result = r.result
        r.put("error", err)
