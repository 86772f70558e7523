"""Tissue detection: finds tissue on the real H&E slide, nothing on glass, noise or black borders."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_llava.slide import open_slide
from wsi_llava.slide.tissue import tissue_mask


@pytest.fixture(scope="module")
def he_thumb(cmu_svs) -> np.ndarray:
    with open_slide(cmu_svs) as s:
        return s.thumbnail(512)


def test_real_he_has_tissue(he_thumb):
    mask = tissue_mask(he_thumb)
    assert mask.shape == he_thumb.shape[:2] and mask.dtype == bool
    assert 0.1 < mask.mean() < 0.95
    # tissue pixels are the stained (darker, more saturated) ones
    assert he_thumb[mask].mean() < he_thumb[~mask].mean() - 30


def test_glass_noise_and_black_border_are_not_tissue(he_thumb):
    assert not tissue_mask(np.full((300, 400, 3), 255, np.uint8)).any()
    rng = np.random.default_rng(0)
    glass = np.clip(240 + rng.normal(0, 4, (300, 400, 3)), 0, 255).astype(np.uint8)
    assert tissue_mask(glass).mean() < 0.001
    framed = he_thumb.copy()
    framed[:, :40] = 0  # scanner border
    mask = tissue_mask(framed)
    assert not mask[:, :40].any()
    assert abs(mask[:, 40:].mean() - tissue_mask(he_thumb)[:, 40:].mean()) < 0.05


def test_dust_is_removed_and_small_holes_filled():
    img = np.full((400, 400, 3), 245, np.uint8)
    img[100:300, 100:300] = (180, 90, 160)  # a purple tissue piece
    img[195:200, 195:200] = 245  # a pinhole inside it
    img[20:22, 20:22] = (120, 40, 120)  # a speck of dust
    mask = tissue_mask(img)
    assert mask[100:300, 100:300].all()
    assert not mask[20:22, 20:22].any()
    assert mask.sum() == 200 * 200


def test_rejects_non_rgb():
    with pytest.raises(ValueError, match="RGB"):
        tissue_mask(np.zeros((10, 10), np.uint8))
