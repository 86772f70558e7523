"""Fast one-token decoding for :meth:`WSILlava.stream`: a static KV cache and a CUDA-graph-captured step.

The eager loop calls the Hugging Face model once per token: hundreds of small kernels launched from
Python per token, a few per cent of what the GPU's memory bandwidth allows on a 7B model. Here the
prefill stays the eager Hugging Face call (so the first token is exactly the eager one); its KV cache is
copied into preallocated buffers, and every later token runs one decode step written against the
model's own weights (Llama-family layout), captured once into a CUDA graph and replayed. In ``compile``
mode the per-layer maths is also fused with ``torch.compile`` before capture.

Modes: ``off`` (the eager loop), ``static`` (static buffers, no graph: the CPU-testable part),
``graph`` and ``compile`` (CUDA only). Unsupported models (other architectures, peft-wrapped or
quantised layers, hooks, sliding windows, length-dependent rope) use the eager loop; a failure while
compiling or capturing drops to the next simpler mode with one logged warning.

``WSILlava.stream`` launches step t+1 as soon as token t is chosen, so the GPU computes it while the
text of token t is decoded and yielded. Numerics: in float32 the step's logits are bit-identical to the
eager Hugging Face step (7B, 128 greedy tokens on an H100); in bf16 its attention runs over the whole
masked buffer with another SDPA kernel, so logits differ by about as much as eager bf16 differs from a
float32 reference (a few per cent on random weights), and near-ties can pick another token.

Only :meth:`WSILlava.stream` imports this module, so ``import wsi_llava`` stays torch-free.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wsi_llava.errors import ModelError

logger = logging.getLogger(__name__)

ENV_VAR = "WSI_LLAVA_FAST_DECODE"
MODES = ("off", "static", "graph", "compile")
#: what ``fast_decode=None`` / ``True`` means on a CUDA device. ``compile`` reaches 153 tok/s on an H100
#: (7B, bf16) against 122 for ``graph`` (benchmarks/results/decode.json), but costs ~8 s of CPU-bound
#: compiling per process: at the first answer, or beside featurization when warmed in a thread, where it
#: slowed a cold first slide from 26.0 to 32.2 s (benchmarks/results/cold_answer_policies.json). It saves
#: ~0.3 s per 200-token answer, so it pays off after ~25 answers: batch jobs set
#: ``WSI_LLAVA_FAST_DECODE=compile`` (it falls back to ``graph`` by itself when compiling fails).
DEFAULT_CUDA_MODE = "graph"
#: architectures whose decoder layer :func:`_layer_in` / :func:`_layer_out` reproduce
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
#: KV buffers grow in steps of this many positions
CAPACITY_STEP = 256

_OFF = ("0", "false", "off", "no")
_ON = ("1", "true", "on", "yes", "auto")


class UnsupportedModel(Exception):
    """The LLM cannot use the fast decode step (the reason is the message); the eager loop is used."""


def resolve_mode(flag: bool | str | None, device_type: str) -> str:
    """The decode mode for ``flag`` (``WSILlava.fast_decode``) on ``device_type``.

    ``None`` reads ``$WSI_LLAVA_FAST_DECODE`` and defaults to on for CUDA, off elsewhere; ``True`` means
    the device's best mode; graph modes need CUDA and become ``static`` elsewhere.
    """
    source = "fast_decode"
    if flag is None:
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env:
            flag, source = env, f"${ENV_VAR}"
    if flag is None:
        return DEFAULT_CUDA_MODE if device_type == "cuda" else "off"
    value = str(flag).strip().lower() if not isinstance(flag, bool) else ("1" if flag else "0")
    if value in _OFF:
        return "off"
    if value in _ON:
        return DEFAULT_CUDA_MODE if device_type == "cuda" else "static"
    if value in MODES:
        return value if device_type == "cuda" or value in ("off", "static") else "static"
    raise ModelError(f"{source}={flag!r}: expected on/off (1/0) or one of {', '.join(MODES)}")


# --- the decode step (module-level functions so that torch.compile reuses one graph for every layer) ---


def _rms(x: Any, weight: Any, eps: float) -> Any:
    """LlamaRMSNorm, op for op (float32 statistics, cast back, then the weight)."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate_half(x: Any) -> Any:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _layer_in(
    x: Any,
    ln: Any,
    eps: float,
    wq: Any,
    bq: Any,
    wk: Any,
    bk: Any,
    wv: Any,
    bv: Any,
    cos: Any,
    sin: Any,
    head_dim: int,
) -> tuple[Any, Any, Any]:
    """Input norm, q/k/v projections and rotary embedding for one token of each of the ``b`` rows of
    ``x`` (b, 1, hidden): (b, heads, 1, head_dim) each."""
    b = x.shape[0]
    h = _rms(x, ln, eps)
    q = F.linear(h, wq, bq).view(b, 1, -1, head_dim).transpose(1, 2)
    k = F.linear(h, wk, bk).view(b, 1, -1, head_dim).transpose(1, 2)
    v = F.linear(h, wv, bv).view(b, 1, -1, head_dim).transpose(1, 2)
    q = (q * cos) + (_rotate_half(q) * sin)
    k = (k * cos) + (_rotate_half(k) * sin)
    return q, k, v


def _layer_out(
    x: Any,
    q: Any,
    k_cache: Any,
    v_cache: Any,
    mask: Any,
    scaling: float,
    wo: Any,
    bo: Any,
    ln: Any,
    eps: float,
    wg: Any,
    bg: Any,
    wu: Any,
    bu: Any,
    wd: Any,
    bd: Any,
) -> Any:
    """Attention over the static cache (masked past each row's current position), output projection,
    MLP; row ``i`` of ``x`` / ``q`` attends to row ``i`` of the caches (b, kv_heads, capacity, head_dim)."""
    b, n_kv = q.shape[0], k_cache.shape[1]
    # grouped-query attention without copying K/V: the query heads of one KV head act as its queries
    qg = q.reshape(b, n_kv, -1, q.shape[-1])
    attn = F.scaled_dot_product_attention(qg, k_cache, v_cache, attn_mask=mask, scale=scaling)
    x = x + F.linear(attn.reshape(b, 1, -1), wo, bo)
    h = _rms(x, ln, eps)
    return x + F.linear(F.silu(F.linear(h, wg, bg)) * F.linear(h, wu, bu), wd, bd)


@dataclass
class _Layer:
    ln1: Any
    eps1: float
    wq: Any
    bq: Any
    wk: Any
    bk: Any
    wv: Any
    bv: Any
    wo: Any
    bo: Any
    ln2: Any
    eps2: float
    wg: Any
    bg: Any
    wu: Any
    bu: Any
    wd: Any
    bd: Any


def _linear(module: Any, what: str) -> tuple[Any, Any]:
    if type(module) is not nn.Linear:
        raise UnsupportedModel(
            f"{what} is a {type(module).__name__}, not a plain Linear (LoRA or quantised?)"
        )
    return module.weight, module.bias


def _norm(module: Any, what: str) -> tuple[Any, float]:
    if not type(module).__name__.endswith("RMSNorm") or not hasattr(module, "variance_epsilon"):
        raise UnsupportedModel(f"{what} is a {type(module).__name__}, not a Llama-style RMSNorm")
    return module.weight, float(module.variance_epsilon)


def _parts(llm: Any) -> tuple[Any, list[_Layer], Any, Any]:
    """(config, layers, final norm, lm head) of a supported LLM, else ``UnsupportedModel``."""
    if hasattr(llm, "peft_config"):
        raise UnsupportedModel("the LLM is peft-wrapped (merge the adapter to decode fast)")
    cfg = getattr(llm, "config", None)
    mtype = getattr(cfg, "model_type", None)
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModel(
            f"model type {mtype!r} (fast decoding knows {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if getattr(cfg, "sliding_window", None) is not None and (
        mtype == "mistral" or getattr(cfg, "use_sliding_window", False)
    ):
        raise UnsupportedModel("sliding-window attention")
    act = getattr(cfg, "hidden_act", None)
    if act != "silu":
        raise UnsupportedModel(f"hidden_act {act!r} (only silu)")
    base = getattr(llm, "model", None)
    if base is None or not hasattr(base, "layers") or not hasattr(base, "rotary_emb"):
        raise UnsupportedModel(f"{type(llm).__name__} has no .model.layers / .model.rotary_emb")
    rope = str(getattr(base.rotary_emb, "rope_type", "default"))
    if "dynamic" in rope or "longrope" in rope:
        raise UnsupportedModel(f"rope type {rope!r} depends on the sequence length")
    if type(base.embed_tokens) is not nn.Embedding:
        raise UnsupportedModel(f"embed_tokens is a {type(base.embed_tokens).__name__}")
    # the step reads the weights directly and never calls the modules, so forward hooks (such as the
    # ones transformers keeps for output_attentions) are bypassed; accelerate's dispatch/offload hooks
    # mean the weights are not all resident, which the step needs
    if any(hasattr(m, "_hf_hook") for m in llm.modules()):
        raise UnsupportedModel("accelerate hooks (device_map / offloading): the weights are not all resident")
    devices = {p.device for p in llm.parameters()}
    if len(devices) != 1:
        raise UnsupportedModel(f"parameters on several devices ({sorted(map(str, devices))})")
    layers = []
    for i, layer in enumerate(base.layers):
        attn, mlp = layer.self_attn, layer.mlp
        if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
            raise UnsupportedModel("attention with q/k norms")
        ln1, eps1 = _norm(layer.input_layernorm, f"layer {i} input_layernorm")
        ln2, eps2 = _norm(layer.post_attention_layernorm, f"layer {i} post_attention_layernorm")
        wq, bq = _linear(attn.q_proj, f"layer {i} q_proj")
        wk, bk = _linear(attn.k_proj, f"layer {i} k_proj")
        wv, bv = _linear(attn.v_proj, f"layer {i} v_proj")
        wo, bo = _linear(attn.o_proj, f"layer {i} o_proj")
        wg, bg = _linear(mlp.gate_proj, f"layer {i} gate_proj")
        wu, bu = _linear(mlp.up_proj, f"layer {i} up_proj")
        wd, bd = _linear(mlp.down_proj, f"layer {i} down_proj")
        layers.append(_Layer(ln1, eps1, wq, bq, wk, bk, wv, bv, wo, bo, ln2, eps2, wg, bg, wu, bu, wd, bd))
    norm = _norm(base.norm, "final norm")
    head = _linear(llm.get_output_embeddings(), "lm_head")
    return cfg, layers, norm, head


def weights_key(llm: Any) -> tuple:
    """Identity of the weights a decoder was built on (a captured graph holds their addresses)."""
    return (id(llm), *(p.data_ptr() for p in llm.parameters()))


def cache_kv(cache: Any, layer: int) -> tuple[Any, Any]:
    """Keys and values (batch, kv_heads, length, head_dim) of one layer of a Hugging Face cache."""
    if hasattr(cache, "layers"):
        entry = cache.layers[layer]
        return entry.keys, entry.values
    if hasattr(cache, "key_cache"):
        return cache.key_cache[layer], cache.value_cache[layer]
    return cache[layer][0], cache[layer][1]


class DecoderParts:
    """What a decode step reads off ``llm`` once: its layers, final norm, head, embedding and rotary, and the
    attention's shape (KV heads, head width, scaling); the one-answer and the batched decoders share it."""

    def __init__(self, llm: Any) -> None:
        self.cfg, self.layers, (self.norm_w, self.norm_eps), (self.head_w, self.head_b) = _parts(llm)
        self.embed_w = llm.model.embed_tokens.weight
        self.rotary = llm.model.rotary_emb
        self.device = self.embed_w.device
        self.dtype = self.embed_w.dtype
        heads = int(self.cfg.num_attention_heads)
        self.n_kv = int(getattr(self.cfg, "num_key_value_heads", None) or heads)
        self.head_dim = int(getattr(self.cfg, "head_dim", None) or self.cfg.hidden_size // heads)
        self.scaling = float(self.head_dim**-0.5)
        self.capacity = 0
        self.capture_seconds = 0.0


class FastDecoder(DecoderParts):
    """Static KV buffers + the one-token decode step of one LLM, reused across answers.

    ``load_prefix`` takes the eager prefill's cache; ``step(token, position)`` returns the next logits
    (1, vocab), a buffer that the following step overwrites.
    """

    def __init__(self, llm: Any, mode: str) -> None:
        if mode not in ("static", "graph", "compile"):
            raise ValueError(f"FastDecoder mode {mode!r}")
        super().__init__(llm)
        if mode != "static" and self.device.type != "cuda":
            mode = "static"
        self.mode = mode
        self._layer_in, self._layer_out = _layer_in, _layer_out
        if mode == "compile":
            from wsi_llava import compile_cache

            compile_cache.configure()  # a later process loads what this one compiles
            self._layer_in = torch.compile(_layer_in, dynamic=False, fullgraph=True)
            self._layer_out = torch.compile(_layer_out, dynamic=False, fullgraph=True)
        self._graph: Any = None
        self._out: Any = None
        self._tok = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        self._pos = torch.zeros((1,), dtype=torch.long, device=self.device)

    # --- buffers -----------------------------------------------------------------------------------
    def ensure_capacity(self, length: int) -> None:
        """Room for ``length`` positions (prompt + answer); growing drops the captured graph."""
        if length <= self.capacity:
            return
        cap = -(-int(length) // CAPACITY_STEP) * CAPACITY_STEP
        self._graph = self._out = None
        self.k = self.v = None  # free the old buffers before allocating the new ones
        shape = (1, self.n_kv, cap, self.head_dim)
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        positions = torch.arange(cap, device=self.device)[None]
        probe = torch.zeros((1, 1, 1), dtype=self.dtype, device=self.device)
        cos, sin = self.rotary(probe, position_ids=positions)  # the model's own rotary tables
        self._cos, self._sin = cos[0].contiguous(), sin[0].contiguous()  # (cap, head_dim)
        self._arange = torch.arange(cap, device=self.device)
        self._neg_inf = torch.full((cap,), float("-inf"), dtype=self.dtype, device=self.device)
        self.capacity = cap
        logger.debug("fast decode: KV buffers for %d positions (%s)", cap, self.mode)

    def load_prefix(self, cache: Any, length: int) -> None:
        """Copy the first ``length`` positions of every layer from a Hugging Face cache."""
        self.ensure_capacity(length + 1)
        for i in range(len(self.layers)):
            k, v = cache_kv(cache, i)
            if k.shape[0] != 1 or k.shape[1] != self.n_kv or k.shape[-1] != self.head_dim:
                raise ModelError(
                    f"prefill cache layer {i} has shape {tuple(k.shape)}: not batch 1 of this LLM"
                )
            self.k[i][:, :, :length].copy_(k[:, :, :length])
            self.v[i][:, :, :length].copy_(v[:, :, :length])

    # --- the step ----------------------------------------------------------------------------------
    def _forward(self) -> Any:
        """One token through every layer; reads ``_tok`` / ``_pos``, writes K/V at ``_pos``."""
        pos = self._pos
        x = F.embedding(self._tok, self.embed_w)
        cos = self._cos.index_select(0, pos).view(1, 1, 1, -1)
        sin = self._sin.index_select(0, pos).view(1, 1, 1, -1)
        # additive mask, built once per step for all layers: 0 up to the current position, -inf after
        mask = self._neg_inf.masked_fill(self._arange <= pos, 0.0).view(1, 1, 1, -1)
        for i, ly in enumerate(self.layers):
            q, k, v = self._layer_in(
                x, ly.ln1, ly.eps1, ly.wq, ly.bq, ly.wk, ly.bk, ly.wv, ly.bv, cos, sin, self.head_dim
            )
            self.k[i].index_copy_(2, pos, k)
            self.v[i].index_copy_(2, pos, v)
            x = self._layer_out(
                x, q, self.k[i], self.v[i], mask, self.scaling, ly.wo, ly.bo,
                ly.ln2, ly.eps2, ly.wg, ly.bg, ly.wu, ly.bu, ly.wd, ly.bd,
            )  # fmt: skip
        return F.linear(_rms(x, self.norm_w, self.norm_eps), self.head_w, self.head_b)[:, -1, :]

    def _warm(self) -> None:
        """Run the step twice on a side stream (compiling it in ``compile`` mode); no graph."""
        stream = torch.cuda.Stream(device=self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # same inputs each time: K/V at _pos are rewritten with the same values
                self._forward()
        torch.cuda.current_stream(self.device).wait_stream(stream)

    def _capture(self) -> None:
        """Warm up (compiling in ``compile`` mode) on a side stream, then capture one step."""
        t0 = time.perf_counter()
        self._warm()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._forward()
        self._graph, self._out = graph, out
        self.capture_seconds = time.perf_counter() - t0
        logger.info("fast decode: captured the %s decode step in %.2f s", self.mode, self.capture_seconds)

    def _drop_mode(self, err: BaseException) -> None:
        nxt = "graph" if self.mode == "compile" else "static"
        logger.warning(
            "fast decode: %s mode failed (%s: %s); using %s", self.mode, type(err).__name__, err, nxt
        )
        self._graph = self._out = None
        self._layer_in, self._layer_out = _layer_in, _layer_out
        self.mode = nxt
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def prepare(self) -> None:
        """Compile the step now rather than at the first token (writes only position 0).

        Safe beside other threads' GPU work (it only runs kernels on a side stream); the CUDA graph
        itself is captured at the first token, which takes well under a second once compiled: a capture
        beside another thread's compiling invalidates both (seen on an H200).
        """
        if self.mode not in ("graph", "compile") or self._graph is not None:
            return
        self._tok.zero_()
        self._pos.zero_()
        try:
            self._warm()
            torch.cuda.current_stream(self.device).synchronize()
        except Exception as e:  # any compile failure: fall back one mode, as at the first token
            self._drop_mode(e)

    def step(self, token: int, position: int) -> Any:
        """Logits (1, vocab) after feeding ``token`` at ``position`` (its K/V land in the buffers)."""
        if position >= self.capacity:
            raise ModelError(f"fast decode: position {position} beyond the {self.capacity} buffered")
        self._tok.fill_(int(token))
        self._pos.fill_(int(position))
        while self.mode in ("graph", "compile") and self._graph is None:
            try:
                self._capture()
            except Exception as e:  # any capture/compile failure: fall back one mode
                self._drop_mode(e)
        if self._graph is not None:
            self._graph.replay()
            return self._out
        return self._forward()
