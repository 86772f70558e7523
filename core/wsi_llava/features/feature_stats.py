"""Where a model's training tile features lie, and whether a slide's tiles lie there too.

The statistic is a Gaussian over the training tile features with a Ledoit-Wolf shrinkage covariance.
A tile's Mahalanobis distance to it is compared with a threshold at a high quantile of training tiles'
distances, calibrated by slide-grouped cross-fitting (each fold's tiles measured against a Gaussian
fitted without their slides), so the threshold holds for slides the fit never saw. A slide or region
is out of distribution when the fraction of its tiles beyond the threshold reaches ``slide_fraction``.

The statistics are keyed to the tile encoder that made the features (its encoder id, the sha256 of
its weights) and to the tiling; a model whose tile encoder differs ignores them with a logged warning.
Stored as safetensors (numpy only: checking a slide never imports torch).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsi_llava.errors import ModelError

logger = logging.getLogger(__name__)

#: file name the training recipe writes into a checkpoint folder
STATS_FILE = "feature_stats.safetensors"
FORMAT = "wsi-llava-feature-stats/1"
#: defaults of the calibration: tile threshold quantile, slide-level fraction of tiles beyond it.
#: Tiles alone separate poorly (real tissue and synthetic tiles overlap); a slide's share of tiles past a
#: moderate quantile separates well, so the quantile is moderate and the fraction a majority.
DEFAULT_QUANTILE = 0.95
DEFAULT_SLIDE_FRACTION = 0.5
DEFAULT_FOLDS = 5


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Mean, Ledoit-Wolf shrunk covariance and shrinkage of the rows of ``x`` (n x d).

    Shrinks the sample covariance towards a scaled identity by the amount that minimises the expected
    squared error (Ledoit & Wolf 2004), so the covariance stays well conditioned in high dimensions.
    """
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    if n < 2:
        raise ValueError(f"need at least 2 feature rows to fit a covariance, got {n}")
    mean = x.mean(axis=0)
    xc = x - mean
    s = xc.T @ xc / n
    mu = float(np.trace(s)) / d
    target_gap = s.copy()
    target_gap[np.diag_indices(d)] -= mu
    delta2 = float(np.sum(target_gap**2)) / d
    sq_norms = np.sum(xc**2, axis=1)
    beta2 = (float(np.sum(sq_norms**2)) / n - float(np.sum(s**2))) / (n * d)
    beta2 = min(max(beta2, 0.0), delta2)
    shrinkage = beta2 / delta2 if delta2 > 0 else 1.0
    cov = (1.0 - shrinkage) * s
    cov[np.diag_indices(d)] += shrinkage * mu
    return mean, cov, shrinkage


def _whitener(cov: np.ndarray) -> np.ndarray:
    """``W`` with ``W cov Wᵀ = I`` (inverse Cholesky factor): ``|W (x - m)|`` is the Mahalanobis distance."""
    return np.linalg.inv(np.linalg.cholesky(cov))


def _distances(x: np.ndarray, mean: np.ndarray, whitener: np.ndarray) -> np.ndarray:
    """Mahalanobis distance of each row of ``x`` (float64 whatever the input, e.g. float16 cached features)."""
    z = (np.asarray(x, dtype=np.float64) - mean) @ whitener.T
    return np.sqrt(np.sum(z * z, axis=1))


@dataclass(frozen=True)
class Verdict:
    """How many of a tile set's tiles lie beyond the training threshold, and what that means."""

    n_tiles: int
    n_beyond: int
    quantile: float
    slide_fraction: float

    @property
    def fraction(self) -> float:
        """Share of the tiles beyond the threshold (0 for an empty tile set)."""
        return self.n_beyond / self.n_tiles if self.n_tiles else 0.0

    @property
    def out_of_distribution(self) -> bool:
        """Whether the answer must carry the warning: ``slide_fraction`` of the tiles or more are beyond."""
        return self.n_tiles > 0 and self.fraction >= self.slide_fraction

    def warning(self, model_name: str, demo: bool, scope: str = "slide") -> str:
        """The plain-language warning an answer carries when the tiles are out of distribution."""
        where = "the region's" if scope == "region" else "the slide's"
        noun = "tile" if self.n_tiles == 1 else "tiles"
        detail = (
            f"{self.n_beyond} of {where} {self.n_tiles} {noun}, {100 * self.fraction:.0f}%, beyond the "
            f"{_percentile(self.quantile)} percentile of the training tiles' distances"
        )
        if demo:
            return (
                f"tiles lie outside the demo model's synthetic training world ({detail}): the demo was "
                "trained on synthetic slides only and this answer says nothing about real tissue"
            )
        return (
            f"tiles lie outside the training data of model {model_name!r} ({detail}): "
            "the answer may not hold for this tissue"
        )


def _percentile(q: float) -> str:
    """``0.95`` -> ``"95th"``, ``0.999`` -> ``"99.9th"``."""
    p = f"{100 * q:.3f}".rstrip("0").rstrip(".")
    suffix = "th"
    if not p.endswith(("11", "12", "13")) and "." not in p:
        suffix = {"1": "st", "2": "nd", "3": "rd"}.get(p[-1], "th")
    return p + suffix


@dataclass(frozen=True)
class FeatureStats:
    """A Gaussian over training tile features plus its calibrated out-of-distribution thresholds."""

    mean: np.ndarray  # (D,)
    whitener: np.ndarray  # (D, D), inverse Cholesky factor of the shrunk covariance
    tile_threshold: float  # Mahalanobis distance at ``quantile`` of cross-fitted training tiles
    quantile: float
    slide_fraction: float
    encoder_id: str
    weights_sha256: str | None = None
    tile_size: int | None = None
    target_mpp: float | None = None
    info: dict[str, Any] = field(default_factory=dict)  # how it was fitted (counts, shrinkage, sources)

    @property
    def dim(self) -> int:
        """Width of the tile features the statistics describe."""
        return int(self.mean.shape[0])

    def distances(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each tile feature (rows of ``features``) to the training Gaussian."""
        f = np.asarray(features)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ModelError(
                f"tile features of shape {tuple(f.shape)} do not fit feature statistics of width {self.dim}"
            )
        return _distances(f, self.mean, self.whitener)

    def verdict(self, distances: np.ndarray) -> Verdict:
        """The verdict for a tile set given its tiles' distances (from :meth:`distances`)."""
        d = np.asarray(distances)
        return Verdict(
            n_tiles=int(d.size),
            n_beyond=int(np.count_nonzero(d > self.tile_threshold)),
            quantile=self.quantile,
            slide_fraction=self.slide_fraction,
        )

    # --- file ------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the statistics as safetensors (float32 tensors, the rest as metadata), atomically."""
        from safetensors.numpy import save

        from wsi_llava.atomic import atomic_write_bytes

        path = Path(path)
        meta = {
            "format": FORMAT,
            "tile_threshold": repr(float(self.tile_threshold)),
            "quantile": repr(float(self.quantile)),
            "slide_fraction": repr(float(self.slide_fraction)),
            "encoder_id": self.encoder_id,
            "weights_sha256": self.weights_sha256 or "",
            "tile_size": "" if self.tile_size is None else str(int(self.tile_size)),
            "target_mpp": "" if self.target_mpp is None else repr(float(self.target_mpp)),
            "info": json.dumps(self.info, sort_keys=True),
        }
        tensors = {
            "mean": np.ascontiguousarray(self.mean, dtype=np.float32),
            "whitener": np.ascontiguousarray(self.whitener, dtype=np.float32),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_bytes(path, save(tensors, metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        """Read a file written by :meth:`save`; anything else raises ``ModelError`` naming the file."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise ModelError(f"{path}: feature statistics file not found")
        try:
            with safe_open(str(path), framework="np") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        except Exception as e:
            raise ModelError(f"{path}: not a readable feature statistics file ({e})") from None
        if meta.get("format") != FORMAT:
            raise ModelError(f"{path}: not a wsi-llava feature statistics file (format {FORMAT!r} expected)")
        try:
            mean = tensors["mean"].astype(np.float64)
            whitener = tensors["whitener"].astype(np.float64)
            stats = cls(
                mean=mean,
                whitener=whitener,
                tile_threshold=float(meta["tile_threshold"]),
                quantile=float(meta["quantile"]),
                slide_fraction=float(meta["slide_fraction"]),
                encoder_id=meta["encoder_id"],
                weights_sha256=meta.get("weights_sha256") or None,
                tile_size=int(meta["tile_size"]) if meta.get("tile_size") else None,
                target_mpp=float(meta["target_mpp"]) if meta.get("target_mpp") else None,
                info=json.loads(meta.get("info") or "{}"),
            )
        except (KeyError, ValueError) as e:
            raise ModelError(f"{path}: feature statistics field {e} missing or malformed") from None
        if mean.ndim != 1 or whitener.shape != (mean.shape[0], mean.shape[0]):
            raise ModelError(
                f"{path}: mean {mean.shape} and whitener {whitener.shape} do not form a {mean.shape[0]}-d Gaussian"
            )
        return stats


# --- fitting ---------------------------------------------------------------------------------------
def fit_feature_stats(
    slides: Sequence[np.ndarray],
    *,
    encoder_id: str,
    weights_sha256: str | None = None,
    tile_size: int | None = None,
    target_mpp: float | None = None,
    quantile: float = DEFAULT_QUANTILE,
    slide_fraction: float = DEFAULT_SLIDE_FRACTION,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    info: dict[str, Any] | None = None,
) -> FeatureStats:
    """Fit the Gaussian to every tile of ``slides`` (one N_i x D array each) and calibrate the threshold.

    The tile threshold is the ``quantile`` of distances measured out of fold: slides are split into
    ``folds`` groups and each group's tiles are measured against a Gaussian fitted to the others, as a
    new slide is measured against the shipped one (an in-sample quantile would sit too low).
    """
    if not 0.5 < quantile < 1:
        raise ValueError(f"quantile must lie in (0.5, 1), got {quantile}")
    if not 0 < slide_fraction <= 1:
        raise ValueError(f"slide_fraction must lie in (0, 1], got {slide_fraction}")
    arrays = [np.asarray(s, dtype=np.float64) for s in slides if len(s)]
    if len(arrays) < max(folds, 2):
        raise ValueError(f"need at least {max(folds, 2)} slides with tiles to calibrate, got {len(arrays)}")
    dims = {a.shape[1] for a in arrays}
    if len(dims) != 1:
        raise ValueError(f"tile features of different widths: {sorted(dims)}")
    everything = np.concatenate(arrays)
    mean, cov, shrinkage = ledoit_wolf(everything)
    order = np.random.default_rng(seed).permutation(len(arrays))
    held_out: list[np.ndarray] = [np.empty(0)] * len(arrays)
    for k in range(folds):
        test = order[k::folds]
        train = np.setdiff1d(order, test)
        m, c, _ = ledoit_wolf(np.concatenate([arrays[i] for i in train]))
        w = _whitener(c)
        for i in test:
            held_out[i] = _distances(arrays[i], m, w)
    cross = np.concatenate(held_out)
    threshold = float(np.quantile(cross, quantile))
    per_slide = np.array([float(np.mean(d > threshold)) for d in held_out])
    fit_info = dict(info or {})
    fit_info.update(
        n_slides=len(arrays),
        n_tiles=int(everything.shape[0]),
        dim=int(everything.shape[1]),
        shrinkage=round(float(shrinkage), 6),
        folds=folds,
        cross_fit_distance_median=round(float(np.median(cross)), 4),
        cross_fit_slide_fraction_max=round(float(per_slide.max()), 4),
        in_sample_threshold=round(
            float(np.quantile(_distances(everything, mean, _whitener(cov)), quantile)), 4
        ),
    )
    return FeatureStats(
        mean=mean,
        whitener=_whitener(cov),
        tile_threshold=threshold,
        quantile=quantile,
        slide_fraction=slide_fraction,
        encoder_id=encoder_id,
        weights_sha256=weights_sha256,
        tile_size=tile_size,
        target_mpp=target_mpp,
        info=fit_info,
    )


# --- the model's statistics ------------------------------------------------------------------------
_LOADED: dict[tuple[str, int, int], FeatureStats] = {}
_WARNED: set[tuple[Any, ...]] = set()


def _warn_once(key: tuple[Any, ...], msg: str, *args: Any) -> None:
    """Log a mismatch once per file and model, not on every question of a batch."""
    if key not in _WARNED:
        _WARNED.add(key)
        logger.warning(msg, *args)


def model_feature_stats(model: Any) -> FeatureStats | None:
    """The feature statistics a model ships (``spec.feature_stats``), if they fit its tile encoder.

    None when the model ships none; a named file that is missing or unreadable raises ``ModelError``;
    statistics of another tile encoder or tiling are ignored with a logged warning.
    """
    spec = model.spec
    name = getattr(spec, "feature_stats", None)
    if not name:
        return None
    folder = getattr(model, "checkpoint_dir", None)
    path = Path(name)
    if not path.is_absolute() and folder is not None:
        path = Path(folder) / path
    if not path.is_file():
        where = Path(folder) / "wsi_llava.json" if folder is not None else "wsi_llava.json"
        raise ModelError(f"{where}: feature_stats file {str(path)!r} does not exist")
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _LOADED:
        _LOADED[key] = FeatureStats.load(path)
    stats = _LOADED[key]
    encoder_id = model.tile_encoder_id()
    sha = getattr(getattr(model, "tile_encoder", None), "weights_sha256", None)
    if stats.encoder_id != encoder_id or (sha and stats.weights_sha256 and sha != stats.weights_sha256):
        _warn_once(
            (*key, encoder_id),
            "%s: feature statistics were made with tile encoder %s, this model's is %s: "
            "no out-of-distribution check",
            path,
            stats.encoder_id,
            encoder_id,
        )
        return None
    tiling = spec.tiling
    if (stats.tile_size is not None and stats.tile_size != tiling.tile_size) or (
        stats.target_mpp is not None and abs(stats.target_mpp - tiling.target_mpp) > 1e-6
    ):
        _warn_once(
            (*key, tiling.tile_size, tiling.target_mpp),
            "%s: feature statistics were made with %s px tiles at %s µm/px, this model tiles %s px at %s: "
            "no out-of-distribution check",
            path,
            stats.tile_size,
            stats.target_mpp,
            tiling.tile_size,
            tiling.target_mpp,
        )
        return None
    return stats
