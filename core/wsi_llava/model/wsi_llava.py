"""``WSILlava``: a projector that turns slide tokens into LLM embeddings, spliced in at ``<image>``.

Imitates Hugging Face ``modeling_llava``: one splice point (:meth:`WSILlava.embed`) used by training
(:meth:`forward`), streaming generation (:meth:`stream`) and evidence (:meth:`visual_relevance`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, Field
from torch import nn

from wsi_llava.errors import ModelError
from wsi_llava.model import evidence
from wsi_llava.model.build import build_tile_encoder, tile_encoder_id
from wsi_llava.model.spec import GenerationSpec, ModelSpec
from wsi_llava.model.templates import IGNORE_INDEX, IMAGE_TOKEN_INDEX, PromptParts, build_prompt

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


@dataclass
class Spliced:
    """Output of :meth:`WSILlava.embed`: LLM inputs with the visual embeddings in place."""

    inputs_embeds: torch.Tensor  # (B, L - 1 + n_vis, hidden)
    attention_mask: torch.Tensor  # (B, L - 1 + n_vis)
    position_ids: torch.Tensor  # (B, L - 1 + n_vis)
    labels: torch.Tensor | None  # -100 over visual positions
    image_starts: torch.Tensor  # (B,) first visual position of each row
    n_visual: int


CancelLike = Any  # a wsi_llava.progress.CancelToken, or a callable returning True to stop


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _is_cancelled(cancel: CancelLike) -> bool:
    if cancel is None:
        return False
    if hasattr(cancel, "cancelled"):
        return bool(cancel.cancelled)
    return bool(cancel())


def _banned_ngram_tokens(ids: Sequence[int], n: int) -> list[int]:
    """Tokens that would repeat an n-gram already in ``ids`` (as ``no_repeat_ngram_size`` does)."""
    if n <= 0 or len(ids) + 1 < n:
        return []
    if n == 1:
        return list(set(ids))
    prefix = tuple(ids[len(ids) - n + 1 :])
    return [ids[i + n - 1] for i in range(len(ids) - n + 1) if tuple(ids[i : i + n - 1]) == prefix]


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    cum = torch.cumsum(probs, dim=-1)
    remove = cum - probs > top_p  # keep the smallest set whose mass reaches top_p (>= 1 token)
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def _held_back(text: str, stops: Sequence[str]) -> int:
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


class WSILlava(nn.Module):
    """Projector + any Hugging Face causal LM (+ optional slide encoder), with its tokenizer and spec.

    ``fast_decode`` picks how :meth:`stream` decodes after the prefill: ``None`` (default) reads
    ``$WSI_LLAVA_FAST_DECODE`` and is on for CUDA, off on CPU; ``True``/``False``, or a mode of
    :mod:`wsi_llava.model.fast_decode` (``static``, ``graph``, ``compile``). Settable at any time.
    """

    def __init__(
        self,
        llm: nn.Module,
        tokenizer: Any,
        projector: nn.Module,
        spec: ModelSpec,
        slide_encoder: nn.Module | None = None,
        tile_encoder: nn.Module | None = None,
        fast_decode: bool | str | None = None,
    ) -> None:
        super().__init__()
        self.fast_decode = fast_decode
        self._fast: tuple[tuple, Any] | None = None  # (key, FastDecoder or None when unsupported)
        self._fast_lock = threading.Lock()
        self._warm_thread: threading.Thread | None = None
        self.llm = llm
        self.tokenizer = tokenizer
        self.projector = projector
        self.spec = spec
        self.slide_encoder = slide_encoder
        self.tile_encoder = tile_encoder
        self.last_generation: GenerationResult | None = None
        self.checkpoint_dir: Path | None = None  # set by the loaders; resolves relative weight paths

    def __getstate__(self) -> dict[str, Any]:
        # copies and pickles leave the fast decoder (CUDA graph, buffers) and its lock behind
        state = self.__dict__.copy()
        state["_fast"] = None
        state["_warm_thread"] = None
        state.pop("_fast_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._fast_lock = threading.Lock()

    # --- basics ----------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.llm.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.llm.parameters()).dtype

    @property
    def n_visual_tokens(self) -> int:
        return self.spec.n_visual_tokens

    def prompt(self, question: str, answer: str | None = None) -> PromptParts:
        """Token ids for ``question`` in this model's template (labels too when ``answer`` is given)."""
        return build_prompt(self.spec.template, self.tokenizer, question, answer)

    def encode_slide(
        self, features: torch.Tensor, coords: torch.Tensor, tile_size_level0: int
    ) -> torch.Tensor:
        """Tile features (N, D) + level-0 coords (N, 2) -> visual tokens (n_tokens, in_dim).

        Without autograd: a graph kept through every LongNet layer (and the exact math attention path
        that gradients need) would hold tens of GiB on a whole slide.
        """
        if self.slide_encoder is None:
            raise ModelError(
                f"model {self.spec.name!r} has no slide encoder: it takes precomputed visual tokens "
                f"({self.n_visual_tokens}x{self.spec.projector.in_dim})"
            )
        p = next(self.slide_encoder.parameters())
        with torch.no_grad():
            return self.slide_encoder(
                torch.as_tensor(features).to(p.device, p.dtype),
                torch.as_tensor(coords).to(p.device),
                tile_size_level0,
            )

    def tile_feature_dim(self) -> int | None:
        """Width of the tile features this model's tile encoder makes, known without building it."""
        if self.tile_encoder is not None:
            return int(self.tile_encoder.embed_dim)
        te = self.spec.tile_encoder
        if te.embed_dim is not None:
            return te.embed_dim
        if te.source is None:
            from wsi_llava import plugins

            entry = plugins.tile_encoders().get(te.name)
            if entry is not None and "embed_dim" in entry.meta:
                return int(entry.meta["embed_dim"])
        return None

    def tile_encoder_id(self) -> str:
        """The feature-cache id of the tile encoder (name + weights checksum), known without building it."""
        return tile_encoder_id(self.spec, self.checkpoint_dir, self.tile_encoder)

    def slide_problems(self) -> list[str]:
        """Why this model cannot answer about a slide; empty when it can. Cheap: run before featurizing."""
        spec, problems = self.spec, []
        te = spec.tile_encoder
        if self.slide_encoder is None:
            problems.append(
                f"it has no slide encoder: it takes precomputed {self.n_visual_tokens}x{spec.projector.in_dim} "
                "visual tokens (ask about an official .pt feature file with `wsi-llava ask --features FILE.pt`), "
                "or register it with its tile and slide encoders: "
                "`wsi-llava models add NAME --llava FOLDER --tile-encoder FOLDER`"
            )
        random_tiles = self.tile_encoder is None and te.source is None and te.weights is None
        if random_tiles and not (spec.demo or spec.untrained):  # only declared-untrained models may
            problems.append(
                f"its tile encoder {te.name!r} has no weights and would be random: register the model with "
                "--tile-encoder FOLDER (a timm hub folder such as Prov-GigaPath's)"
            )
        if self.slide_encoder is not None:
            cfg = getattr(self.slide_encoder, "config", None)
            dim = self.tile_feature_dim()
            if cfg is not None and dim is not None and dim != cfg.in_dim:
                problems.append(
                    f"its tile encoder gives {dim}-d features, its slide encoder takes {cfg.in_dim}-d"
                )
            if cfg is not None and cfg.out_dim != spec.projector.in_dim:
                problems.append(
                    f"its slide encoder gives {cfg.out_dim}-d tokens, its projector takes {spec.projector.in_dim}-d"
                )
        return problems

    def require_slide_ready(self) -> None:
        """Raise ``ModelError`` naming every missing or misfitting part (see :meth:`slide_problems`)."""
        problems = self.slide_problems()
        if problems:
            raise ModelError(f"model {self.spec.name!r} cannot answer about slides: " + "; ".join(problems))

    def build_tile_encoder(self) -> nn.Module:
        """The tile encoder named in the spec, with this checkpoint's weights (or its own when trained here)."""
        if self.tile_encoder is not None:
            return self.tile_encoder
        return build_tile_encoder(self.spec, self.checkpoint_dir)

    def _embed_tokens(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    # --- the one splice point --------------------------------------------------------------------
    def embed(
        self,
        input_ids: torch.Tensor,
        visual_tokens: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> Spliced:
        """Project ``visual_tokens`` (B, n_vis, in_dim) and put them where each row's -200 is.

        One placeholder becomes ``n_vis`` positions (LLaVA semantics); every row needs exactly one.
        """
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if visual_tokens is None:
            raise ValueError("input_ids hold an <image> placeholder but no visual tokens were given")
        if visual_tokens.dim() == 2:
            visual_tokens = visual_tokens[None]
        bsz, length = input_ids.shape
        if visual_tokens.shape[0] != bsz:
            raise ValueError(f"{bsz} prompts but visual tokens for {visual_tokens.shape[0]}")
        is_img = input_ids == IMAGE_TOKEN_INDEX
        counts = is_img.sum(dim=1)
        if not bool((counts == 1).all()):
            raise ValueError(
                f"each prompt needs exactly one <image> placeholder ({IMAGE_TOKEN_INDEX}); got {counts.tolist()}"
            )
        device = self._embed_tokens().weight.device
        input_ids = input_ids.to(device)
        pdtype = next(self.projector.parameters()).dtype
        vis = self.projector(visual_tokens.to(device=device, dtype=pdtype))
        text = self._embed_tokens()(input_ids.masked_fill(is_img.to(device), 0))
        vis = vis.to(text.dtype)
        n_vis = vis.shape[1]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(device)
        starts = is_img.to(device).int().argmax(dim=1)
        embeds, masks, labs = [], [], []
        for b in range(bsz):
            p = int(starts[b])
            embeds.append(torch.cat([text[b, :p], vis[b], text[b, p + 1 :]]))
            ones = attention_mask.new_ones(n_vis)
            masks.append(torch.cat([attention_mask[b, :p], ones, attention_mask[b, p + 1 :]]))
            if labels is not None:
                lb = labels[b].to(device)
                labs.append(torch.cat([lb[:p], lb.new_full((n_vis,), IGNORE_INDEX), lb[p + 1 :]]))
        mask = torch.stack(masks)
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return Spliced(
            inputs_embeds=torch.stack(embeds),
            attention_mask=mask,
            position_ids=position_ids,
            labels=torch.stack(labs) if labels is not None else None,
            image_starts=starts,
            n_visual=n_vis,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        visual_tokens: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """The LLM's output (with ``loss`` when ``labels`` are given) for right-padded batches."""
        s = self.embed(input_ids, visual_tokens, attention_mask=attention_mask, labels=labels)
        return self.llm(
            inputs_embeds=s.inputs_embeds,
            attention_mask=s.attention_mask,
            position_ids=s.position_ids,
            labels=s.labels,
            **kwargs,
        )

    # --- generation ------------------------------------------------------------------------------
    def _stop_token_ids(self) -> set[int]:
        ids: set[int] = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        gen_cfg = getattr(self.llm, "generation_config", None)
        eos = getattr(gen_cfg, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list | tuple):
            ids.update(int(e) for e in eos)
        return ids

    def context_length(self) -> int | None:
        """Positions the LLM was built for (``max_position_embeddings`` of its config); None if it says none."""
        cfg = getattr(self.llm, "config", None)
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(cfg, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return None

    def check_request(
        self,
        question: str,
        *,
        n_visual: int | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        no_repeat_ngram_size: int | None = None,
    ) -> tuple[PromptParts, GenerationSpec]:
        """The prompt of ``question`` and the decoding settings (unset ones from ``spec.generation``).

        Cheap (it only tokenises): run it before featurizing. Raises ``ModelError`` for a setting out of
        range, or when prompt (text + ``n_visual`` tokens, default the model's) plus an explicit
        ``max_new_tokens`` exceeds the LLM's context; the default answer length shrinks to what fits.
        """
        gen = self.spec.generation.with_overrides(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            no_repeat_ngram_size=no_repeat_ngram_size,
        )
        parts = self.prompt(question)
        n_vis = self.n_visual_tokens if n_visual is None else int(n_visual)
        n_text = len(parts.input_ids) - 1  # the placeholder becomes the visual tokens
        context = self.context_length()
        if context is None:
            return parts, gen
        room = context - n_text - n_vis
        if room < 1 or (max_new_tokens is not None and gen.max_new_tokens > room):
            asked = (
                f" + {gen.max_new_tokens} answer tokens (max_new_tokens)"
                if max_new_tokens is not None
                else ""
            )
            hint = "shorten the question" + (" or lower max_new_tokens" if room >= 1 else "")
            raise ModelError(
                f"question too long for model {self.spec.name!r}: {n_text} text tokens + {n_vis} visual tokens"
                f"{asked} exceed its context of {context} tokens (max_position_embeddings); {hint}"
            )
        if gen.max_new_tokens > room:
            logger.info("answer limited to %d tokens: the rest of the %d-token context", room, context)
            gen = gen.model_copy(update={"max_new_tokens": room})
        return parts, gen

    def _visual_2d(self, visual_tokens: torch.Tensor) -> torch.Tensor:
        vt = torch.as_tensor(visual_tokens)
        if vt.dim() == 3:
            if vt.shape[0] != 1:
                raise ValueError(f"stream takes the visual tokens of one slide, got a batch of {vt.shape[0]}")
            vt = vt[0]
        if vt.dim() != 2 or vt.shape[1] != self.spec.projector.in_dim:
            raise ModelError(
                f"visual tokens of shape {tuple(vt.shape)}: expected (n_tokens, {self.spec.projector.in_dim})"
            )
        return vt

    def _cache_arg(self) -> str:
        """``cache`` (transformers >= 5.2x) or ``past_key_values`` (older), whichever the LLM takes."""
        import inspect

        base = self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm
        return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"

    def _fast_decoder(self, mode: str, length: int) -> Any:
        """The fast decoder for ``length`` positions, or None when the LLM cannot use it."""
        from wsi_llava.model.fast_decode import FastDecoder, UnsupportedModel, weights_key

        key = (mode, *weights_key(self.llm))
        if self._fast is None or self._fast[0] != key:
            self._fast = None  # release the old buffers and graph first
            try:
                dec = FastDecoder(self.llm, mode)
            except UnsupportedModel as e:
                logger.warning("fast decoding is off for this model: %s", e)
                dec = None
            self._fast = (key, dec)
        dec = self._fast[1]
        if dec is not None:
            dec.ensure_capacity(length)
        return dec

    def warm_fast_decode(self, length: int | None = None, *, background: bool = True) -> bool:
        """Compile the fast decode step now, in a thread by default, so that the first answer does not
        wait for it (``SlideSession`` starts this while the slide is featurized).

        ``length``: prompt + answer positions to hold (default: the visual tokens, 128 text tokens and
        ``spec.generation.max_new_tokens``). Also runs one throwaway prefill of that prompt length so
        that its kernels are loaded. Returns False when there is nothing to prepare (decoding off, or a
        decoder of this mode and size already built).
        """
        from wsi_llava.model.fast_decode import resolve_mode

        mode = resolve_mode(self.fast_decode, self.device.type)
        if mode == "off" or (self._warm_thread and self._warm_thread.is_alive()):
            return False
        max_new = self.spec.generation.max_new_tokens
        length = int(length) if length is not None else self.n_visual_tokens + 128 + max_new
        dec = self._fast[1] if self._fast is not None else None
        if dec is not None and dec.mode == mode and dec.capacity >= length:
            return False  # an earlier warm-up or answer built it: nothing to do again
        prompt = max(1, length - max_new)

        def work() -> None:
            t0 = time.perf_counter()
            try:
                with self._fast_lock, torch.inference_mode():
                    if self.device.type == "cuda":
                        torch.cuda.set_device(self.device)
                    width = self.llm.get_input_embeddings().weight.shape[1]
                    dtype = self.llm.get_input_embeddings().weight.dtype
                    embeds = torch.zeros((1, prompt, width), dtype=dtype, device=self.device)
                    self.llm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
                    dec = self._fast_decoder(mode, length)
                    if dec is not None:
                        dec.prepare()
                    if self.device.type == "cuda":
                        torch.cuda.current_stream(self.device).synchronize()
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
        self._warm_thread = threading.Thread(target=work, name="wsi-decode-warmup")
        self._warm_thread.start()
        return True

    def wait_fast_decode(self) -> None:
        """Block until a :meth:`warm_fast_decode` thread is over (``stream`` does this itself)."""
        t = self._warm_thread
        if t is not None and t is not threading.current_thread():
            t.join()

    def release_fast_decoder(self) -> None:
        """Free the fast decoder's KV buffers and CUDA graph now (the next :meth:`stream` rebuilds them)."""
        self._fast = None

    def _begin_fast(self, past: Any, prompt_len: int, max_new: int) -> Any:
        """The fast decoder holding the prefill's K/V, locked for this stream; None: decode eagerly."""
        from wsi_llava.model.fast_decode import resolve_mode

        mode = resolve_mode(self.fast_decode, self.device.type)
        if mode != "off" and max_new >= 2:
            self.wait_fast_decode()  # a warm-up in flight finishes first: it is building this decoder
        if mode == "off" or max_new < 2 or not self._fast_lock.acquire(blocking=False):
            return None  # off, nothing to decode after the prefill, or another stream is using it
        try:
            dec = self._fast_decoder(mode, prompt_len + max_new)
            if dec is not None:
                dec.load_prefix(past, prompt_len)
        except Exception as e:
            logger.warning("fast decoding unavailable (%s: %s); decoding eagerly", type(e).__name__, e)
            dec = None
        if dec is None:
            self._fast_lock.release()
        return dec

    @torch.inference_mode()
    def stream(
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
    ) -> Iterator[str]:
        """Answer ``question`` about ``visual_tokens`` (n_vis, in_dim), yielding text as it is decoded.

        KV-cached: one prefill, then one token per step; greedy at temperature 0, else seeded sampling.
        Unset arguments take ``spec.generation``. ``self.last_generation`` holds the result afterwards.
        """
        vt = self._visual_2d(visual_tokens)
        parts, gen = self.check_request(
            question,
            n_visual=vt.shape[0],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            no_repeat_ngram_size=no_repeat_ngram_size,
        )
        max_new, temp, top_p, ngram = gen.max_new_tokens, gen.temperature, gen.top_p, gen.no_repeat_ngram_size
        s = self.embed(torch.tensor([parts.input_ids], dtype=torch.long), vt[None])
        result = GenerationResult(prompt_len=s.inputs_embeds.shape[1], n_visual_tokens=s.n_visual)
        self.last_generation = result
        stops = parts.stop_strings
        stop_ids = self._stop_token_ids() | set(parts.stop_token_ids)
        generator = None
        if temp > 0:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(int(seed) if seed is not None else int(torch.seed() % (2**63)))

        cache_arg = self._cache_arg()
        t0 = time.perf_counter()
        out = self.llm(
            inputs_embeds=s.inputs_embeds,
            attention_mask=s.attention_mask,
            position_ids=s.position_ids,
            use_cache=True,
            logits_to_keep=1,
        )
        past = _cache_of(out)
        logits = out.logits[:, -1, :]
        fast = self._begin_fast(past, s.inputs_embeds.shape[1], max_new)
        locked = fast is not None
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        result.prefill_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        new_ids: list[int] = []
        emitted = 0
        cur_len = s.inputs_embeds.shape[1]
        reason: str = "max_tokens"
        text = ""
        try:
            while len(new_ids) < max_new:
                if _is_cancelled(cancel):
                    reason = "cancelled"
                    break
                step = logits[0].float()
                if ngram:
                    banned = _banned_ngram_tokens(new_ids, int(ngram))
                    if banned:
                        step = step.clone()
                        step[banned] = float("-inf")
                if temp > 0:
                    step = step / temp
                    if top_p is not None and top_p < 1:
                        step = _top_p_filter(step, float(top_p))
                    probs = torch.softmax(step, dim=-1)
                    tok = int(torch.multinomial(probs, 1, generator=generator))
                else:
                    tok = int(torch.argmax(step))
                if tok in stop_ids:
                    reason = "eos"
                    break
                new_ids.append(tok)
                launched = False
                if fast is not None and len(new_ids) < max_new:
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
                text = self.tokenizer.decode(new_ids, skip_special_tokens=True).lstrip()
                hit = min((text.find(st) for st in stops if st in text), default=-1)
                if hit >= 0:
                    text = text[:hit]
                    reason = "stop_string"
                    break
                safe = len(text) - _held_back(text, stops)
                if safe > emitted:
                    chunk = text[emitted:safe]
                    emitted = safe
                    result.text = text[:emitted]
                    yield chunk
                if len(new_ids) >= max_new:
                    break
                cur_len += 1
                if launched:
                    continue
                out = self.llm(
                    input_ids=torch.tensor([[tok]], device=self.device),
                    attention_mask=torch.ones((1, cur_len), dtype=torch.long, device=self.device),
                    use_cache=True,
                    **{cache_arg: past},
                )
                past = _cache_of(out)
                logits = out.logits[:, -1, :]
            text = text.rstrip("\ufffd")
            if len(text) > emitted:
                yield text[emitted:]
                emitted = len(text)
        finally:
            if locked:
                self._fast_lock.release()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            result.decode_seconds = time.perf_counter() - t1
            result.new_token_ids = list(new_ids)
            result.n_new_tokens = len(new_ids)
            result.text = text[:emitted] if emitted else ""
            result.stop_reason = reason  # type: ignore[assignment]

    def generate_text(self, question: str, visual_tokens: torch.Tensor, **kwargs: Any) -> str:
        """The whole answer at once (drains :meth:`stream`)."""
        return "".join(self.stream(question, visual_tokens, **kwargs))

    # --- evidence --------------------------------------------------------------------------------
    def visual_relevance(
        self,
        question: str,
        visual_tokens: torch.Tensor,
        answer_ids: Sequence[int] | torch.Tensor,
        *,
        layers: Literal["last_half", "all"] = "last_half",
    ) -> np.ndarray:
        """Attention from the answer-producing positions to each visual token, summing to 1 (see
        :func:`wsi_llava.model.evidence.visual_relevance`)."""
        return evidence.visual_relevance(self, question, visual_tokens, answer_ids, layers=layers)
