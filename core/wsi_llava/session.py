"""``SlideSession``: tile features are extracted once per slide, then any number of questions.

A question is about the whole slide or about a region; a region runs the same chain on the tiles
inside it only (row-major order). Answers stream chunk by chunk and end as an ``Answer`` with
evidence (per-tile relevance) and timings.
"""

from __future__ import annotations

import errno
import logging
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi_llava.answer import Answer, Evidence, Timings
from wsi_llava.errors import CacheError, Cancelled, WsiLlavaError
from wsi_llava.progress import CancelToken, ProgressCallback, no_progress
from wsi_llava.settings import cache_dir as default_cache_dir
from wsi_llava.settings import resolve_device
from wsi_llava.slide.region import Region

if TYPE_CHECKING:
    from wsi_llava.features.cache import CachedFeatures
    from wsi_llava.model.generation import GenerationResult
    from wsi_llava.model.wsi_llava import WSILlava

logger = logging.getLogger(__name__)

#: slide-encoder outputs kept per session (tile selections: the whole slide and the last few regions)
VISUAL_MEMO_SIZE = 8
DEMO_NOTICE = "wsi-llava demo model: not a diagnostic model"
UNTRAINED_NOTICE = "untrained demo weights: the answer is not meaningful until trained weights ship"
UNTRAINED_MODEL_NOTICE = (
    "untrained model: some of its parts are randomly initialised; the answer is not meaningful"
)


class SlideSession:
    """One slide, one model: features once, then ``ask`` / ``ask_stream`` many times."""

    def __init__(
        self,
        slide: str | Path,
        model: str | Path | WSILlava = "demo",
        *,
        mpp: float | None = None,
        reader: str | None = None,
        cache_dir: str | Path | None = None,
        device: str = "auto",
        dtype: str | None = None,
        batch_size: int = 64,
        model_base: str | Path | None = None,
    ) -> None:
        from wsi_llava.features.cache import FeatureCache
        from wsi_llava.slide import open_slide
        from wsi_llava.slide.tiling import make_tile_grid

        self.device = resolve_device(device)
        self.reader = open_slide(slide, mpp=mpp, reader=reader)
        try:
            _ = self.reader.mpp  # a missing or implausible µm/px fails here, before the model loads
            if isinstance(model, str | Path):
                from wsi_llava.model import load_model
                from wsi_llava.settings import using_cache_dir

                with using_cache_dir(cache_dir):  # a packaged LLM is converted under the same cache root
                    model = load_model(model, device=self.device, dtype=dtype, model_base=model_base)
            model.require_slide_ready()  # a missing or random part fails here, before any featurization
            self.model = model
            spec = model.spec
            self.grid = make_tile_grid(
                self.reader, target_mpp=spec.tiling.target_mpp, tile_size=spec.tiling.tile_size
            )
            if len(self.grid.coords) == 0:
                raise WsiLlavaError(f"{self.reader.path}: no tissue found on the slide")
        except BaseException:
            self.reader.close()
            raise
        model.warm_fast_decode()  # CUDA: compiles the decode step while the slide is featurized
        self.cache = FeatureCache(default_cache_dir(cache_dir) / "features")
        self.batch_size = batch_size
        self._features: CachedFeatures | None = None
        self._tile_encoder = None
        self._visual_memo: OrderedDict[tuple[int, ...], Any] = OrderedDict()
        self._tile_distances: tuple[Any, np.ndarray] | None = None  # (statistics, distances), once per slide
        self.last_answer: Answer | None = None

    # --- features ------------------------------------------------------------------------------
    @property
    def tile_encoder(self):
        """The model's tile encoder, built on first use.

        On CUDA a separately built encoder runs with bf16 weights: beside a 7B LLM, a ViT-g's fp32
        weights plus autocast's bf16 copies would not fit a 24 GB card.
        """
        if self._tile_encoder is None:
            from wsi_llava.model.build import own_tile_encoder

            enc = self.model.build_tile_encoder()
            separate = enc is not self.model.tile_encoder and not own_tile_encoder(self.model.spec)
            enc = inference_tile_encoder(enc, self.device, separate=separate)
            self._tile_encoder = enc.to(self.device).eval()
        return self._tile_encoder

    def extract(
        self, progress: ProgressCallback | None = None, cancel: CancelToken | None = None
    ) -> CachedFeatures:
        """Tile features of the whole slide, from the cache or computed once (cancellable)."""
        if self._features is None:
            from wsi_llava.features.extract import cache_key_for, extract_features

            hit = self.cache.get(cache_key_for(self.reader, self.grid, self.model.tile_encoder_id()))
            if hit is not None:  # no need to build (and load) the tile encoder at all
                (progress or no_progress)(hit.n_tiles, hit.n_tiles, "features from cache")
                self._features = hit
                return hit
            try:
                self._features = extract_features(
                    self.reader,
                    self.grid,
                    self.tile_encoder,
                    self.cache,
                    device=self.device,
                    batch_size=self.batch_size,
                    progress=progress or no_progress,
                    cancel=cancel,
                )
            except OSError as e:  # the cache's own errors are CacheErrors: this is the disk or the OS
                raise _extraction_failure(e, self.cache.root, self.reader.path) from None
            self.release_tile_encoder()
        return self._features

    def release_tile_encoder(self) -> None:
        """Free the tile encoder once the features are in hand (a ViT-g holds gigabytes of GPU memory)."""
        if self._tile_encoder is None or self._tile_encoder is self.model.tile_encoder:
            return
        self._tile_encoder = None
        if str(self.device).startswith("cuda"):
            import gc

            import torch

            gc.collect()
            torch.cuda.empty_cache()

    def feature_warnings(self, indices: np.ndarray, scope: str = "slide") -> list[str]:
        """The out-of-distribution warning for the tiles at ``indices`` if most lie far from the training tiles."""
        from wsi_llava.features.feature_stats import model_feature_stats

        stats = model_feature_stats(self.model)
        if stats is None:
            return []
        if self._tile_distances is None or self._tile_distances[0] is not stats:
            self._tile_distances = (stats, stats.distances(self.extract().features))
        verdict = stats.verdict(self._tile_distances[1][indices])
        spec = self.model.spec
        return [verdict.warning(spec.name, spec.demo, scope)] if verdict.out_of_distribution else []

    def tiles_for(self, region: Region | None, source: str = "region") -> np.ndarray:
        """Grid indices of the tiles a question covers: all of them, or those inside ``region``."""
        if region is None:
            return np.arange(len(self.grid.coords))
        from wsi_llava.slide.tiling import select_tiles

        return select_tiles(self.grid, region, source=source)

    def visual_tokens(self, indices: np.ndarray):
        """Slide-encoder output (n_tokens x dim) for the tiles at ``indices`` (memoised)."""
        import torch

        key = tuple(int(i) for i in indices)
        if key in self._visual_memo:
            self._visual_memo.move_to_end(key)
            return self._visual_memo[key]
        feats = self.extract()
        x = torch.from_numpy(np.asarray(feats.features[indices], dtype=np.float32))
        coords = torch.from_numpy(np.asarray(feats.coords[indices], dtype=np.int64))
        visual = self.model.encode_slide(x, coords, self.grid.tile_size_level0)
        self._visual_memo[key] = visual
        while len(self._visual_memo) > VISUAL_MEMO_SIZE:  # the last few selections: many users, few regions
            self._visual_memo.popitem(last=False)
        return visual

    # --- questions -----------------------------------------------------------------------------
    def ask_stream(
        self,
        question: str,
        region: Region | None = None,
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        seed: int | None = None,
        evidence: bool = True,
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
    ) -> Iterator[str]:
        """Yield the answer text chunk by chunk; ``self.last_answer`` holds the ``Answer`` afterwards."""
        t0 = time.perf_counter()
        indices = self.scope(question, region, max_new_tokens=max_new_tokens, temperature=temperature)
        t_feat0 = time.perf_counter()
        self.extract(progress=progress, cancel=cancel)
        visual = self.visual_tokens(indices)
        warnings = self.feature_warnings(indices, "region" if region is not None else "slide")
        t_features = time.perf_counter() - t_feat0

        gen_kw: dict[str, Any] = {"cancel": cancel, "seed": seed}
        if max_new_tokens is not None:
            gen_kw["max_new_tokens"] = max_new_tokens
        if temperature is not None:
            gen_kw["temperature"] = temperature
        yield from self.model.stream(self.model_question(question, region), visual, **gen_kw)
        self.last_answer = self.build_answer(
            question,
            region,
            indices,
            self.model.last_generation,
            evidence=evidence,
            warnings=warnings,
            t0=t0,
            t_features=t_features,
        )

    def scope(
        self,
        question: str,
        region: Region | None,
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
    ) -> np.ndarray:
        """Check the question and region (cheap, before any featurization); the grid indices they cover."""
        self.check_question(
            question, max_new_tokens=max_new_tokens, temperature=temperature, region=region is not None
        )
        source = region.name or region.id or "region" if region is not None else "slide"
        if region is not None:
            w, h = self.reader.dimensions
            region.check_within(w, h, source=f"region {source!r}")
        return self.tiles_for(region, source=f"region {source!r}")

    def build_answer(
        self,
        question: str,
        region: Region | None,
        indices: np.ndarray,
        gen: GenerationResult,
        *,
        evidence: bool,
        warnings: list[str],
        t0: float,
        t_features: float,
    ) -> Answer:
        """The ``Answer`` of a finished generation (the evidence pass runs here): the one way every front end
        (``ask_stream``, the server) turns decoded tokens into an answer."""
        if gen.stop_reason == "cancelled":
            raise Cancelled("answer cancelled by the user")
        ev = Evidence(tile_size=int(self.grid.tile_size_level0))
        if evidence and len(gen.new_token_ids) > 0:
            ev = self._evidence(self.model_question(question, region), gen.new_token_ids, indices)
        spec = self.model.spec
        notice = None
        if spec.demo:
            notice = DEMO_NOTICE + ("; " + UNTRAINED_NOTICE if spec.untrained else "")
        elif spec.untrained:
            notice = UNTRAINED_MODEL_NOTICE
        return Answer(
            question=question,
            answer=gen.text.strip(),
            scope="region" if region is not None else "slide",
            region=region,
            model=spec.name,
            demo=spec.demo,
            notice=notice,
            warnings=warnings,
            slide=str(self.reader.path),
            evidence=ev,
            timings=Timings(
                features=round(t_features, 4),
                prefill=round(gen.prefill_seconds, 4),
                decode=round(gen.decode_seconds, 4),
                seconds=round(time.perf_counter() - t0, 4),
                new_tokens=len(gen.new_token_ids),
                decode_path=gen.decode_path,
            ),
        )

    def check_question(
        self,
        question: str,
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        region: bool = False,
    ) -> None:
        """Refuse an empty or undecodable question, bad decoding settings, or a prompt longer than the
        model's context, with one ``WsiLlavaError``; cheap, so callers run it before :meth:`extract`."""
        if not isinstance(question, str) or not question.strip():
            raise WsiLlavaError("question is empty: type a question about the slide or region")
        self.model.check_request(
            self.model.spec.model_question(question, "region" if region else "slide"),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
        )

    def model_question(self, question: str, region: Region | None) -> str:
        """``question`` as the LLM is asked it: about ``region``, with the model's region cue."""
        return self.model.spec.model_question(question, "region" if region is not None else "slide")

    def ask(self, question: str, region: Region | None = None, **kw: Any) -> Answer:
        """Answer a question (whole slide when ``region`` is None) and return the ``Answer``."""
        for _ in self.ask_stream(question, region, **kw):
            pass
        assert self.last_answer is not None
        return self.last_answer

    def _evidence(self, question: str, answer_ids, indices: np.ndarray) -> Evidence:
        feats = self.extract()
        scores = self.model.tile_relevance(
            question,
            np.asarray(feats.features[indices], dtype=np.float32),
            np.asarray(feats.coords[indices], dtype=np.int64),
            self.grid.tile_size_level0,
            answer_ids,
        )
        coords = self.grid.coords[indices]
        return Evidence(
            tile_indices=[int(i) for i in indices],
            coords=[(int(x), int(y)) for x, y in coords],
            scores=[round(float(s), 6) for s in scores],
            tile_size=int(self.grid.tile_size_level0),
        )

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> SlideSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def inference_tile_encoder(encoder: Any, device: str, separate: bool) -> Any:
    """``encoder`` as answers run it: on CUDA one built apart from the model (not in its checkpoint) gets
    bf16 weights; ``extract --model`` prepares its encoder the same way."""
    if separate and str(device).startswith("cuda"):
        import torch

        encoder.model.to(torch.bfloat16)
    return encoder


def _extraction_failure(e: OSError, cache_root: Path, slide: Path) -> WsiLlavaError:
    """One clear error for an OS failure while features were extracted and cached."""
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return CacheError(
            f"{cache_root}: disk full while writing the feature cache of {slide.name} ({e.strerror or e}); "
            "free some space or choose another folder with --cache"
        )
    where = e.filename or cache_root
    return CacheError(f"{where}: extracting features of {slide.name} failed ({e.strerror or e})")


def ask_tokens(
    model: WSILlava,
    visual: Any,
    question: str,
    *,
    source: str | None = None,
    on_chunk: Any = None,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    seed: int | None = None,
    cancel: CancelToken | None = None,
) -> Answer:
    """Answer about precomputed visual tokens (e.g. a released 576x1024 ``.pt``): no slide, no evidence tiles.

    ``on_chunk`` receives the text as it streams; ``source`` names the feature file in the Answer.
    """
    if not question or not question.strip():
        raise WsiLlavaError("question is empty: type a question about the slide")
    t0 = time.perf_counter()
    gen_kw: dict[str, Any] = {"cancel": cancel, "seed": seed}
    if max_new_tokens is not None:
        gen_kw["max_new_tokens"] = max_new_tokens
    if temperature is not None:
        gen_kw["temperature"] = temperature
    for chunk in model.stream(question, visual, **gen_kw):
        if on_chunk is not None:
            on_chunk(chunk)
    gen = model.last_generation
    if gen.stop_reason == "cancelled":
        raise Cancelled("answer cancelled by the user")
    spec = model.spec
    return Answer(
        question=question,
        answer=gen.text.strip(),
        scope="slide",
        model=spec.name,
        demo=spec.demo,
        notice=DEMO_NOTICE if spec.demo else None,
        slide=source,
        evidence=Evidence(method="none: precomputed visual tokens carry no tile positions"),
        timings=Timings(
            prefill=round(gen.prefill_seconds, 4),
            decode=round(gen.decode_seconds, 4),
            seconds=round(time.perf_counter() - t0, 4),
            new_tokens=len(gen.new_token_ids),
            decode_path=gen.decode_path,
        ),
    )
