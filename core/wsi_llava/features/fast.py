"""``FastTileEncoder``: a tile encoder run for throughput on CUDA (bf16, compiled transformer blocks).

The wrapped :class:`~wsi_llava.features.tile.TileEncoder` is left untouched: the fast model is a shallow
copy whose blocks share its parameters, with each transformer block compiled by ``torch.compile``
(one compiled graph serves every block of a timm ViT, so compiling takes seconds, not minutes).
Attention runs through timm's fused SDPA (flash attention on Hopper). A compile failure is logged
and the eager model is used.

On CUDA the compiling happens in the background: the first batch starts a thread that compiles and
runs the compiled copy once on a side stream, while the calling thread keeps encoding eagerly; later
batches use the compiled copy once it is ready. The first slide of a process thus never waits for
the ~10 s of compiling a ViT-g (``benchmarks/results/cold_answer.json``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
from typing import Any

import torch
import torch.nn as nn

from wsi_llava import compile_cache

logger = logging.getLogger(__name__)

#: attribute of the wrapped encoder that holds its fast wrappers, per (device, compile flag)
_ATTR = "_wsi_llava_fast"


def _blocks(model: nn.Module) -> nn.Sequential | None:
    blocks = getattr(model, "blocks", None)
    return blocks if isinstance(blocks, nn.Sequential) and len(blocks) > 0 else None


def _compiled_copy(model: nn.Module) -> nn.Module:
    """A shallow copy of ``model`` sharing every parameter, its ``blocks`` (or itself) compiled."""
    blocks = _blocks(model)
    if blocks is None:
        return torch.compile(model, dynamic=False)
    fast = copy.copy(model)
    fast._modules = dict(model._modules)  # type: ignore[assignment] - own module table, same children
    new_blocks = []
    for blk in blocks:
        b = copy.copy(blk)  # shares parameters and submodules; compile() only sets attributes on the copy
        b.compile(dynamic=False)
        new_blocks.append(b)
    fast._modules["blocks"] = nn.Sequential(*new_blocks)
    return fast


class FastTileEncoder:
    """Encode uint8 tiles with ``encoder`` on ``device``: autocast bf16 (CUDA), compiled blocks.

    ``bf16_weights`` runs a bf16 copy of the weights without autocast instead (an option measured by
    ``benchmarks/bench_featurize.py``; the residual stream is then bf16 too); an encoder whose weights
    are bf16 already runs that way without a copy (``SlideSession`` does this beside a resident LLM).

    ``background`` (default: on CUDA) compiles in a thread while the first batches run eagerly;
    :meth:`wait` blocks until that is over. ``compiled`` stays True while compilation is planned or in
    use (callers pad the last batch to the compiled shape), False after a failure.

    ``__call__(tiles)`` takes ``(B, H, W, 3)`` uint8 (numpy or a tensor, ideally already on
    ``device``) and returns ``(B, embed_dim)`` features (float32 on CPU, bf16 on CUDA).
    """

    def __init__(
        self,
        encoder: Any,
        device: Any,
        *,
        compile: bool | None = None,
        bf16_weights: bool = False,
        background: bool | None = None,
    ) -> None:
        self.encoder = encoder
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.compile = self.cuda if compile is None else bool(compile)
        first = next(encoder.model.parameters(), None)
        already_bf16 = first is not None and first.dtype == torch.bfloat16
        self.bf16_weights = bool(bf16_weights) or already_bf16
        self._eager: nn.Module = encoder.model
        if self.bf16_weights and not already_bf16:  # a bf16 copy: pure bf16 (no autocast), more memory
            self._eager = copy.deepcopy(encoder.model).to(self.device, torch.bfloat16).eval()
        self._model = self._eager
        self._compiled_model: nn.Module | None = None
        self.compiled = False
        self.background = self.cuda if background is None else bool(background)
        self._thread: threading.Thread | None = None
        self.compile_seconds: float | None = None  # background compile: first batch -> compiled copy in use
        self._lock = threading.Lock()
        if self.compile:
            compile_cache.configure()  # a later process loads what this one compiles
            try:
                self._compiled_model = _compiled_copy(self._eager)
                self.compiled = True
            except Exception as e:  # noqa: BLE001 - any failure to set up compilation: run eagerly
                logger.warning(
                    "torch.compile of tile encoder %r failed (%s); running eagerly", encoder.name, e
                )
            if self.compiled and not self.background:
                self._model = self._compiled_model
        self._checked = False

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on CUDA (as the reference path), nothing on CPU."""
        if self.cuda and not self.bf16_weights:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @property
    def ready(self) -> bool:
        """True when batches run through the compiled copy (or compilation is off or failed)."""
        return not self.compiled or self._model is not self._eager

    def _forward(self, x: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        out = (model or self._model)(x)
        if out.dim() != 2 or out.shape[-1] != self.encoder.embed_dim:
            from wsi_llava.errors import ModelError

            raise ModelError(
                f"tile encoder {self.encoder.name!r} returned {tuple(out.shape)}, "
                f"expected (B, {self.encoder.embed_dim})"
            )
        return out

    def _beside_compile(self, x: torch.Tensor) -> torch.Tensor:
        """``_forward``, run again once a background compile is over if it failed while one was in flight.

        torch's tracers (``torch.fx``, used while compiling) patch ``nn.Module.__call__`` for the whole
        process for a moment, which fails a module call that another thread makes meanwhile
        ("module is not installed as a submodule"). A real error fails the second run too.
        """
        thread = self._thread
        try:
            return self._forward(x)
        except Exception as e:  # noqa: BLE001 - re-raised below unless a compile was in flight
            if thread is None:
                raise
            logger.debug("tile encoder batch failed beside the background compile (%s); running it again", e)
        self.wait()
        return self._forward(x)

    def _give_up(self, e: BaseException, when: str) -> None:
        logger.warning(
            "compiled tile encoder %r failed %s (%s: %s); running eagerly",
            self.encoder.name,
            when,
            type(e).__name__,
            str(e).splitlines()[0] if str(e) else "",
        )
        self._model, self.compiled = self._eager, False

    def _compile_in_background(self, sample: torch.Tensor) -> None:
        """Start the thread that compiles the copy on ``sample`` (a private clone) and swaps it in."""
        ready = None
        if self.cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        autocast_on = self.cuda and not self.bf16_weights
        t0 = time.perf_counter()

        def work() -> None:
            try:
                if self.cuda:
                    torch.cuda.set_device(self.device)
                    stream = torch.cuda.Stream(self.device)
                    stream.wait_event(ready)
                    ctx: contextlib.AbstractContextManager = torch.cuda.stream(stream)
                else:
                    stream, ctx = None, contextlib.nullcontext()
                with ctx, torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=autocast_on):
                    self._forward(sample, self._compiled_model)
                if stream is not None:
                    stream.synchronize()
            except Exception as e:  # noqa: BLE001 - any compile/run failure: stay eager
                self._give_up(e, "while compiling in the background")
                return
            self.compile_seconds = time.perf_counter() - t0
            self._model = self._compiled_model  # one attribute store: the next batch picks it up
            logger.info(
                "tile encoder %r: compiled copy in use after %.1f s", self.encoder.name, self.compile_seconds
            )

        # not a daemon: interpreter exit waits for a compile in flight instead of tearing it down
        self._thread = threading.Thread(target=work, name="wsi-encoder-compile")
        self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a background compile has finished (or ``timeout``); True when it is over."""
        t = self._thread
        if t is not None:
            t.join(timeout)
            return not t.is_alive()
        return True

    def __call__(self, tiles: Any) -> torch.Tensor:
        """Preprocess and encode uint8 tiles (call under ``torch.inference_mode()``)."""
        with self.autocast():
            x = self.encoder.preprocess(tiles)
            if self.bf16_weights:
                x = x.to(torch.bfloat16)
            if self._checked or not self.compiled:
                return self._beside_compile(x)
            if self.background:  # eager until the thread swaps the compiled copy in
                with self._lock:
                    if self._thread is None:
                        self._compile_in_background(x.clone())
                self._checked = True
                return self._beside_compile(x)
            try:  # compilation happens at the first call: fall back to eager if it fails
                out = self._forward(x)
            except Exception as e:  # noqa: BLE001
                from wsi_llava.errors import ModelError

                if isinstance(e, ModelError):
                    raise
                self._give_up(e, "at its first call")
                out = self._forward(x)
            self._checked = True
            return out


def fast_encoder(encoder: Any, device: Any, *, compile: bool | None = None) -> FastTileEncoder:
    """The (cached per encoder, device and compile flag) fast wrapper of ``encoder``; moves it to ``device``.

    ``compile``: None compiles on CUDA in the background (the first batches run eagerly); True compiles
    before the first batch, so that every batch goes through the same compiled kernels (reproducible
    features, e.g. for cohorts); False runs eagerly.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    encoder.to(dev).eval()
    key = (str(dev), compile)
    per = encoder.__dict__.setdefault(_ATTR, {})
    if key not in per:
        per[key] = FastTileEncoder(
            encoder, dev, compile=compile, background=None if compile is None else False
        )
    return per[key]
