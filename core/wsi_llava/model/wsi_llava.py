"""``WSILlava``: a projector that turns slide tokens into LLM embeddings, spliced in at ``<image>``.

Imitates Hugging Face ``modeling_llava``: one splice point (:meth:`WSILlava.embed`) used by training
(:meth:`forward`), streaming generation (:meth:`stream`) and evidence (:meth:`tile_relevance`). The class
holds the parts and the splice; the decode loop, sampling and fast-decode orchestration live in
:mod:`wsi_llava.model.generation` and the evidence pass in :mod:`wsi_llava.model.evidence`, which the
methods of the same names call.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from wsi_llava.errors import ModelError
from wsi_llava.model import evidence, generation
from wsi_llava.model.build import build_tile_encoder, tile_encoder_id
from wsi_llava.model.generation import GenerationResult
from wsi_llava.model.spec import GenerationSpec, ModelSpec
from wsi_llava.model.templates import IGNORE_INDEX, IMAGE_TOKEN_INDEX, PromptParts, build_prompt

logger = logging.getLogger(__name__)


@dataclass
class Spliced:
    """Output of :meth:`WSILlava.embed`: LLM inputs with the visual embeddings in place."""

    inputs_embeds: torch.Tensor  # (B, L - 1 + n_vis, hidden)
    attention_mask: torch.Tensor  # (B, L - 1 + n_vis)
    position_ids: torch.Tensor  # (B, L - 1 + n_vis)
    labels: torch.Tensor | None  # -100 over visual positions
    image_starts: torch.Tensor  # (B,) first visual position of each row
    n_visual: int


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

    # --- generation (wsi_llava.model.generation) ------------------------------------------------
    def _cache_arg(self) -> str:
        """``cache`` or ``past_key_values``, whichever the LLM takes (see :func:`generation.cache_arg`)."""
        return generation.cache_arg(self)

    def warm_fast_decode(self, length: int | None = None, *, background: bool = True) -> bool:
        """Compile the fast decode step now, in a thread by default (see :func:`generation.warm_fast_decode`)."""
        return generation.warm_fast_decode(self, length, background=background)

    def wait_fast_decode(self) -> None:
        """Block until a :meth:`warm_fast_decode` thread is over (``stream`` does this itself)."""
        t = self._warm_thread
        if t is not None and t is not threading.current_thread():
            t.join()

    def release_fast_decoder(self) -> None:
        """Free the fast decoder's KV buffers and CUDA graph now (the next :meth:`stream` rebuilds them)."""
        self._fast = None

    #: ``model.stream(question, visual_tokens, ...)``: the decode loop of :mod:`.generation`, as a method
    stream = generation.stream

    def generate_text(self, question: str, visual_tokens: torch.Tensor, **kwargs: Any) -> str:
        """The whole answer at once (drains :meth:`stream`)."""
        return "".join(self.stream(question, visual_tokens, **kwargs))

    # --- evidence --------------------------------------------------------------------------------
    def tile_relevance(
        self,
        question: str,
        features: torch.Tensor,
        coords: torch.Tensor,
        tile_size_level0: int,
        answer_ids: Sequence[int] | torch.Tensor,
        *,
        steps: int = evidence.DEFAULT_STEPS,
    ) -> np.ndarray:
        """Per-tile relevance of an answer, summing to 1 (see :func:`wsi_llava.model.evidence.tile_relevance`)."""
        return evidence.tile_relevance(
            self, question, features, coords, tile_size_level0, answer_ids, steps=steps
        )
