"""``wsi-llava train feature-stats``: fit a checkpoint's training tile-feature statistics from feature packs.

The packs are the recipe's own training data (``train prepare``: every tile of the training slides
through the checkpoint's tile encoder). The statistics land in the checkpoint folder and are named in
its ``wsi_llava.json``, so answers on slides far from the training world carry a warning.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from wsi_llava.atomic import atomic_write_text
from wsi_llava.features.feature_stats import (
    DEFAULT_FOLDS,
    DEFAULT_QUANTILE,
    DEFAULT_SLIDE_FRACTION,
    STATS_FILE,
    FeatureStats,
    fit_feature_stats,
)
from wsi_llava.model.spec import SPEC_FILE, ModelSpec
from wsi_llava.train.config import TrainError

logger = logging.getLogger(__name__)


def checkpoint_tile_weights(spec: ModelSpec, folder: Path) -> Path:
    """The tile encoder weights file of the checkpoint at ``folder`` (statistics are keyed to it)."""
    te = spec.tile_encoder
    if te.source is not None:
        from wsi_llava.features.timm_hub import weights_file
        from wsi_llava.model.build import part_path

        return weights_file(part_path(folder, te.source, "tile encoder"))
    if te.weights is None:
        raise TrainError(
            f"{folder / SPEC_FILE}: tile_encoder has no weights (a random encoder): feature statistics "
            "need the trained tile encoder the model runs with"
        )
    path = Path(te.weights)
    path = path if path.is_absolute() else folder / path
    if not path.is_file():
        raise TrainError(f"{folder / SPEC_FILE}: tile_encoder.weights {str(path)!r} does not exist")
    return path


def write_feature_stats(
    packs: Iterable[str | Path],
    checkpoint: str | Path,
    *,
    quantile: float = DEFAULT_QUANTILE,
    slide_fraction: float = DEFAULT_SLIDE_FRACTION,
    folds: int = DEFAULT_FOLDS,
) -> FeatureStats:
    """Fit the statistics to every tile of the packs, write them into ``checkpoint`` and name them in its spec.

    Every pack must have been made with the checkpoint's tile encoder and tiling (checked first).
    """
    from wsi_llava.features.tile import weights_sha256
    from wsi_llava.train.data import load_pack

    folder = Path(checkpoint)
    spec = ModelSpec.load(folder)
    weights = checkpoint_tile_weights(spec, folder)
    sha = weights_sha256(weights)
    encoder_id = f"{spec.tile_encoder.name}:sha256-{sha[:16]}"
    slides: list[np.ndarray] = []
    sources: list[str] = []
    for p in packs:
        pack = load_pack(Path(p))
        if pack["encoder_id"] != encoder_id:
            raise TrainError(
                f"{p}: features made with tile encoder {pack['encoder_id']}, the checkpoint's is {encoder_id} "
                f"({weights}): re-run `train prepare --weights {weights}`"
            )
        if (
            int(pack["tile_size"]) != spec.tiling.tile_size
            or abs(float(pack["target_mpp"]) - spec.tiling.target_mpp) > 1e-6
        ):
            raise TrainError(
                f"{p}: tiles of {pack['tile_size']} px at {pack['target_mpp']} µm/px, the checkpoint tiles "
                f"{spec.tiling.tile_size} px at {spec.tiling.target_mpp} µm/px"
            )
        for entry in pack["slides"].values():
            slides.append(entry["features"].float().numpy())
        sources.append(Path(p).name)
    if not sources:
        raise TrainError("no feature packs given: pass --pack FILE.pt (from `wsi-llava train prepare`)")
    try:
        stats = fit_feature_stats(
            slides,
            encoder_id=encoder_id,
            weights_sha256=sha,
            tile_size=spec.tiling.tile_size,
            target_mpp=spec.tiling.target_mpp,
            quantile=quantile,
            slide_fraction=slide_fraction,
            folds=folds,
            info={"packs": sources},
        )
    except ValueError as e:
        raise TrainError(f"feature statistics: {e}") from None
    if stats.info["cross_fit_slide_fraction_max"] >= slide_fraction:
        logger.warning(
            "%.0f%% of one training slide's tiles lie beyond the threshold when it is left out of the fit: "
            "slides like it would carry the warning (raise --quantile or --slide-fraction)",
            100 * stats.info["cross_fit_slide_fraction_max"],
        )
    stats.save(folder / STATS_FILE)
    _name_in_spec(folder, STATS_FILE)
    logger.info(
        "wrote %s: %d tiles of %d slides, threshold %.3f at q=%s",
        folder / STATS_FILE,
        stats.info["n_tiles"],
        stats.info["n_slides"],
        stats.tile_threshold,
        quantile,
    )
    return stats


def _name_in_spec(folder: Path, name: str) -> None:
    """Set ``feature_stats`` in the checkpoint's ``wsi_llava.json``, leaving every other field as written."""
    path = folder / SPEC_FILE
    data = json.loads(path.read_text(encoding="utf-8"))
    data["feature_stats"] = name
    ModelSpec.model_validate(data)
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
