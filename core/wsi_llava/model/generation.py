"""Generation: the KV-cached decode loop, its sampling, and the fast-decode orchestration around it.

``WSILlava`` keeps the parts and the one splice point (``embed``); this module turns a spliced prompt into
text: one prefill, then one token a step (greedy or seeded sampling, n-gram blocking, stop strings held
back until they are sure), on the static-cache / CUDA-graph decoder of :mod:`~wsi_llava.model.fast_decode`
when it is on, with its warm-up thread and lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from wsi_llava.model.wsi_llava import WSILlava

logger = logging.getLogger(__name__)


class GenerationResult(BaseModel):
    """What the last :meth:`WSILlava.stream` produced, with timings (seconds)."""

    prompt_len: int = Field(description="prompt positions fed to the LLM, visual tokens included")
    n_visual_tokens: int
    new_token_ids: list[int] = Field(default_factory=list)
    text: str = ""
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    n_new_tokens: int = 0
    stop_reason: Literal["eos", "stop_string", "max_tokens", "cancelled"] = "max_tokens"
    decode_path: str = Field(
        "eager", description="eager, or the fast decode mode used: static, graph, compile"
    )


CancelLike = Any  # a wsi_llava.progress.CancelToken, or a callable returning True to stop


def cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def is_cancelled(cancel: CancelLike) -> bool:
    if cancel is None:
        return False
    if hasattr(cancel, "cancelled"):
        return bool(cancel.cancelled)
    return bool(cancel())


def banned_ngram_tokens(ids: Sequence[int], n: int) -> list[int]:
    """Tokens that would repeat an n-gram already in ``ids`` (as ``no_repeat_ngram_size`` does)."""
    if n <= 0 or len(ids) + 1 < n:
        return []
    if n == 1:
        return list(set(ids))
    prefix = tuple(ids[len(ids) - n + 1 :])
    return [ids[i + n - 1] for i in range(len(ids) - n + 1) if tuple(ids[i : i + n - 1]) == prefix]


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    cum = torch.cumsum(probs, dim=-1)
    remove = cum - probs > top_p  # keep the smallest set whose mass reaches top_p (>= 1 token)
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters might still become a stop string or a multi-token character."""
    keep = 0
    if text.endswith("\ufffd"):
        keep = len(text) - len(text.rstrip("\ufffd"))
    body = text[: len(text) - keep]
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(body)), 0, -1):
            if body.endswith(s[:k]):
                longest = max(longest, k)
                break
    return keep + longest


def cache_arg(model: WSILlava) -> str:
    """``cache`` (transformers >= 5.2x) or ``past_key_values`` (older), whichever the LLM takes."""
    import inspect

    base = model.llm.get_base_model() if hasattr(model.llm, "get_base_model") else model.llm
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def fast_decoder(model: WSILlava, mode: str, length: int) -> Any:
    """The fast decoder for ``length`` positions, or None when the LLM cannot use it."""
    from wsi_llava.model.fast_decode import FastDecoder, UnsupportedModel, weights_key

    key = (mode, *weights_key(model.llm))
    if model._fast is None or model._fast[0] != key:
        model._fast = None  # release the old buffers and graph first
        try:
            dec = FastDecoder(model.llm, mode)
        except UnsupportedModel as e:
            logger.warning("fast decoding is off for this model: %s", e)
            dec = None
        model._fast = (key, dec)
    dec = model._fast[1]
    if dec is not None:
        dec.ensure_capacity(length)
    return dec


def warm_length(model: WSILlava) -> int:
    """Positions a decoder is warmed for by default: the visual tokens, 128 text tokens and the answer."""
    return model.n_visual_tokens + 128 + model.spec.generation.max_new_tokens


def warm_fast_decode(model: WSILlava, length: int | None = None, *, background: bool = True) -> bool:
    """Compile the fast decode step now, in a thread by default, so that the first answer does not
    wait for it (``SlideSession`` starts this while the slide is featurized).

    ``length``: prompt + answer positions to hold (default: the visual tokens, 128 text tokens and
    ``spec.generation.max_new_tokens``). Also runs one throwaway prefill of that prompt length so
    that its kernels are loaded. Returns False when there is nothing to prepare (decoding off, or a
    decoder of this mode and size already built).
    """
    from wsi_llava.model.fast_decode import resolve_mode

    mode = resolve_mode(model.fast_decode, model.device.type)
    if mode == "off" or (model._warm_thread and model._warm_thread.is_alive()):
        return False
    max_new = model.spec.generation.max_new_tokens
    length = int(length) if length is not None else warm_length(model)
    dec = model._fast[1] if model._fast is not None else None
    if dec is not None and dec.mode == mode and dec.capacity >= length:
        return False  # an earlier warm-up or answer built it: nothing to do again
    prompt = max(1, length - max_new)

    def work() -> None:
        t0 = time.perf_counter()
        try:
            with model._fast_lock, torch.inference_mode():
                if model.device.type == "cuda":
                    torch.cuda.set_device(model.device)
                width = model.llm.get_input_embeddings().weight.shape[1]
                dtype = model.llm.get_input_embeddings().weight.dtype
                embeds = torch.zeros((1, prompt, width), dtype=dtype, device=model.device)
                model.llm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
                dec = fast_decoder(model, mode, length)
                if dec is not None:
                    dec.prepare()
                if model.device.type == "cuda":
                    torch.cuda.current_stream(model.device).synchronize()
        except Exception as e:  # the first answer builds it again (or decodes eagerly)
            logger.warning("warming the fast decoder failed (%s: %s)", type(e).__name__, e)
            return
        logger.info(
            "fast decoder warmed (%s, %d positions) in %.1f s", mode, length, time.perf_counter() - t0
        )

    if not background:
        work()
        return True
    # not a daemon: exit waits for a compile in flight instead of tearing CUDA down under it
    model._warm_thread = threading.Thread(target=work, name="wsi-decode-warmup")
    model._warm_thread.start()
    return True


def begin_fast(model: WSILlava, past: Any, prompt_len: int, max_new: int) -> Any:
    """The fast decoder holding the prefill's K/V, locked for this stream; None: decode eagerly."""
    from wsi_llava.model.fast_decode import resolve_mode

    mode = resolve_mode(model.fast_decode, model.device.type)
    if mode != "off" and max_new >= 2:
        model.wait_fast_decode()  # a warm-up in flight finishes first: it is building this decoder
    if mode == "off" or max_new < 2 or not model._fast_lock.acquire(blocking=False):
        return None  # off, nothing to decode after the prefill, or another stream is using it
    try:
        dec = fast_decoder(model, mode, prompt_len + max_new)
        if dec is not None:
            dec.load_prefix(past, prompt_len)
    except Exception as e:
        logger.warning("fast decoding unavailable (%s: %s); decoding eagerly", type(e).__name__, e)
        dec = None
    if dec is None:
        model._fast_lock.release()
    return dec


class AnswerState:
    """One answer's per-token rules, shared by :func:`stream` and the batcher: token choice (greedy or
    seeded sampling, n-gram blocking), stop tokens and strings, and the text held back until it is sure.
    """

    def __init__(self, model: WSILlava, parts: Any, gen: Any, seed: int | None) -> None:
        self.tokenizer = model.tokenizer
        self.stops: Sequence[str] = parts.stop_strings
        self.stop_ids = model._stop_token_ids() | set(parts.stop_token_ids)
        self.max_new, self.temp = int(gen.max_new_tokens), float(gen.temperature)
        self.top_p, self.ngram = gen.top_p, gen.no_repeat_ngram_size
        self.generator: torch.Generator | None = None
        if self.temp > 0:
            self.generator = torch.Generator(device=model.device)
            self.generator.manual_seed(int(seed) if seed is not None else int(torch.seed() % (2**63)))
        self.new_ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.reason: str = "max_tokens"
        self.done = self.max_new <= 0

    @property
    def wants_more(self) -> bool:
        """Whether another decode step is needed after the token just chosen."""
        return not self.done and len(self.new_ids) < self.max_new

    def choose(self, logits: torch.Tensor, greedy: int | None = None) -> int | None:
        """Pick the next token from ``logits`` (vocab,) and keep it; None (and done) on a stop token.

        ``greedy``: the argmax of these logits when already known (the batcher takes it for all rows at
        once); used at temperature 0 unless n-gram blocking bans it.
        """
        banned = banned_ngram_tokens(self.new_ids, int(self.ngram)) if self.ngram else []
        if self.temp <= 0 and greedy is not None and greedy not in banned:
            tok = int(greedy)
        else:
            step = logits.float()
            if banned:
                step = step.clone()
                step[banned] = float("-inf")
            if self.temp > 0:
                step = step / self.temp
                if self.top_p is not None and self.top_p < 1:
                    step = top_p_filter(step, float(self.top_p))
                probs = torch.softmax(step, dim=-1)
                tok = int(torch.multinomial(probs, 1, generator=self.generator))
            else:
                tok = int(torch.argmax(step))
        if tok in self.stop_ids:
            self.reason, self.done = "eos", True
            return None
        self.new_ids.append(tok)
        return tok

    def chunk(self) -> str:
        """The text of the tokens so far that is now safe to show ("" when none); ends the answer on a
        stop string (the text before it comes from :meth:`tail`) or at ``max_new`` tokens."""
        text = self.tokenizer.decode(self.new_ids, skip_special_tokens=True).lstrip()
        hit = min((text.find(st) for st in self.stops if st in text), default=-1)
        if hit >= 0:
            self.text, self.reason, self.done = text[:hit], "stop_string", True
            return ""
        self.text = text
        if len(self.new_ids) >= self.max_new:
            self.done = True
        safe = len(text) - held_back(text, self.stops)
        if safe <= self.emitted:
            return ""
        out = text[self.emitted : safe]
        self.emitted = safe
        return out

    def cancel(self) -> None:
        self.reason, self.done = "cancelled", True

    def tail(self) -> str:
        """The text still held back once the answer is over (a partial multi-byte character dropped)."""
        self.text = self.text.rstrip("\ufffd")
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out

    def fill(self, result: GenerationResult) -> None:
        """Write ids, shown text and stop reason into ``result``."""
        result.new_token_ids = list(self.new_ids)
        result.n_new_tokens = len(self.new_ids)
        result.text = self.text[: self.emitted] if self.emitted else ""
        result.stop_reason = self.reason  # type: ignore[assignment]


def checked_request(
    model: WSILlava,
    question: str,
    visual_tokens: torch.Tensor,
    *,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    no_repeat_ngram_size: int | None = None,
) -> tuple[torch.Tensor, Any, Any]:
    """``(visual tokens 2-D, prompt parts, generation settings)`` of a request, checked (raises at once)."""
    vt = model._visual_2d(visual_tokens)
    parts, gen = model.check_request(
        question,
        n_visual=vt.shape[0],
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        no_repeat_ngram_size=no_repeat_ngram_size,
    )
    return vt, parts, gen


def splice(model: WSILlava, parts: Any, vt: torch.Tensor) -> Any:
    """The prompt with the visual tokens spliced in, batch 1 (``WSILlava.embed``)."""
    return model.embed(torch.tensor([parts.input_ids], dtype=torch.long), vt[None])


def prefill(model: WSILlava, s: Any) -> tuple[Any, torch.Tensor]:
    """The KV cache and last position's logits of the spliced prompt ``s`` (one eager LLM call)."""
    out = model.llm(
        inputs_embeds=s.inputs_embeds,
        attention_mask=s.attention_mask,
        position_ids=s.position_ids,
        use_cache=True,
        logits_to_keep=1,
    )
    return cache_of(out), out.logits[:, -1, :]


@torch.inference_mode()
def stream(
    model: WSILlava,
    question: str,
    visual_tokens: torch.Tensor,
    *,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    no_repeat_ngram_size: int | None = None,
    seed: int | None = None,
    cancel: CancelLike = None,
) -> Iterator[str]:
    """Answer ``question`` about ``visual_tokens`` (n_vis, in_dim), yielding text as it is decoded.

    KV-cached: one prefill, then one token per step; greedy at temperature 0, else seeded sampling.
    Unset arguments take ``spec.generation``. ``model.last_generation`` holds the result afterwards.
    """
    vt, parts, gen = checked_request(
        model,
        question,
        visual_tokens,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        no_repeat_ngram_size=no_repeat_ngram_size,
    )
    s = splice(model, parts, vt)
    result = GenerationResult(prompt_len=s.inputs_embeds.shape[1], n_visual_tokens=s.n_visual)
    model.last_generation = result
    ans = AnswerState(model, parts, gen, seed)

    cache_name = cache_arg(model)
    t0 = time.perf_counter()
    past, logits = prefill(model, s)
    fast = begin_fast(model, past, s.inputs_embeds.shape[1], ans.max_new)
    locked = fast is not None
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    result.prefill_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    cur_len = s.inputs_embeds.shape[1]
    try:
        while not ans.done:
            if is_cancelled(cancel):
                ans.cancel()
                break
            tok = ans.choose(logits[0])
            if tok is None:
                break
            launched = False
            if fast is not None and ans.wants_more:
                # start the next step now: the GPU computes it while the text below is decoded and
                # yielded (if that text ends the answer, the step is wasted, not wrong)
                try:
                    logits = fast.step(tok, cur_len)
                    past = None  # the static buffers hold everything from here on
                    result.decode_path = fast.mode
                    launched = True
                except Exception as e:
                    if past is None:
                        raise
                    logger.warning("fast decoding failed (%s: %s); decoding eagerly", type(e).__name__, e)
                    fast = None
            chunk = ans.chunk()
            if chunk:
                result.text = ans.text[: ans.emitted]
                yield chunk
            if ans.done:
                break
            cur_len += 1
            if launched:
                continue
            out = model.llm(
                input_ids=torch.tensor([[tok]], device=model.device),
                attention_mask=torch.ones((1, cur_len), dtype=torch.long, device=model.device),
                use_cache=True,
                **{cache_name: past},
            )
            past = cache_of(out)
            logits = out.logits[:, -1, :]
        tail = ans.tail()
        if tail:
            yield tail
    finally:
        if locked:
            model._fast_lock.release()
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        result.decode_seconds = time.perf_counter() - t1
        ans.fill(result)
