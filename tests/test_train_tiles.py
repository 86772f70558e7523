"""Tile-text alignment (the demo's tile encoder stage) and its hand-over to stage 1, on a real tiny world."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from wsi_llava.train.command import train_command
from wsi_llava.train.config import TrainError
from wsi_llava.train.loop import read_log


def _train(args: list[str]) -> None:
    res = CliRunner().invoke(train_command, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from wsi_llava.synth import generate_world

    root = tmp_path_factory.mktemp("tiles_world")
    generate_world(root / "world", 2, seed=5, size=(2048, 2048), split="train")
    return root / "world"


@pytest.fixture(scope="module")
def tile_pack(world: Path) -> Path:
    out = world.parent / "tiles.pt"
    _train(["prepare-tiles", "--bench", str(world), "--out", str(out), "--max-tiles-per-region", "24"])
    return out


def test_tile_pack_pairs_annotated_tiles_with_region_descriptions(world: Path, tile_pack: Path) -> None:
    import json

    from wsi_llava.slide import open_slide
    from wsi_llava.slide.tiling import make_tile_grid, read_tiles
    from wsi_llava.train.tile_pack import load_tile_packs

    data = load_tile_packs([tile_pack])
    assert data.tile_encoder == "demo-vit" and tuple(data.tiles.shape[1:]) == (3, 112, 112)
    assert len(data.texts) >= 3 and all(t.split(":")[0] for t in data.texts)
    # the frozen text embeddings travel in the pack (a GPU machine needs no text model)
    assert data.text_encoder == {"name": "minilm", "max_length": 128}
    assert tuple(data.text_features.shape) == (len(data.texts), 384)
    # the stored tile is the slide's tile at that grid index, resized to the encoder input (JPEG q92)
    import torch

    raw = torch.load(tile_pack, weights_only=True)
    item = raw["items"][0]
    manifest = json.loads((world / "manifest.json").read_text())
    stem = item["slide"].split("/")[-1]
    slide = next(s for s in manifest["slides"] if s["stem"] == stem)
    reader = open_slide(world / slide["path"])
    grid = make_tile_grid(reader, target_mpp=0.5, tile_size=256)
    tile = read_tiles(reader, grid, [item["tile"]])[0]
    reader.close()
    small = torch.nn.functional.interpolate(
        torch.from_numpy(tile).permute(2, 0, 1)[None].float(), size=(112, 112), mode="bicubic", antialias=True
    )[0]
    diff = (data.tiles[0].float() - small.clamp(0, 255)).abs().mean().item()
    assert diff < 6.0, diff
    # each tile comes from the annotated polygon asked about, and its description names that polygon's class
    from wsi_llava.synth.labels import TISSUE_CLASSES

    phrase = {c.qupath_name: c.phrase for c in TISSUE_CLASSES.values()}
    regions = {r["id"]: r for s in manifest["slides"] for r in s["regions"]}
    for it, tid in zip(raw["items"], data.text_ids, strict=True):
        cls = regions[it["region"]]["properties"]["classification"]["name"]
        assert data.texts[tid].lower().startswith(phrase[cls]), (cls, data.texts[tid])
    assert len({it["region"] for it in raw["items"]}) > 2


def test_tile_stage_trains_and_hands_encoder_to_stage1(world: Path, tile_pack: Path, tmp_path: Path) -> None:
    from wsi_llava.features.tile import build_tile_encoder, weights_sha256
    from wsi_llava.model.spec import ModelSpec
    from wsi_llava.train.data import load_pack, prepare_pack
    from wsi_llava.train.tile_pack import load_tile_packs

    n = len(load_tile_packs([tile_pack]).text_ids)  # one full batch per step: the same batch every time
    cfg = tmp_path / "tiles.yaml"
    cfg.write_text(
        f"data: {{tile_packs: [{tile_pack}], val_fraction: 0.0}}\naugment: false\n"
        "optim: {lr: 2.0e-4, warmup_ratio: 0.0, scheduler: constant}\n"
        f"train: {{epochs: 5, batch_size: {n}, bf16: false, save_every: 3}}\n",
        encoding="utf-8",
    )
    _train(["tiles", "--config", str(cfg), "--out", str(tmp_path / "tiles"), "--device", "cpu"])
    losses = [
        r["loss"] for r in read_log(tmp_path / "tiles" / "log.jsonl") if "loss" in r and "event" not in r
    ]
    assert len(losses) == 5 and losses[-1] < losses[0]
    weights = tmp_path / "tiles" / "final" / "tile_encoder.safetensors"
    assert (tmp_path / "tiles" / "final" / "tiles_metrics.json").is_file()
    enc = build_tile_encoder("demo-vit", weights=weights)
    assert enc.trained and enc.encoder_id.endswith(weights_sha256(weights)[:16])

    # packs made with the random encoder do not fit a stage 1 that ships the trained one
    random_pack = prepare_pack([world], tmp_path / "random.pt", cache_dir=tmp_path / "cache")
    s1 = tmp_path / "s1.yaml"
    body = (
        f"model: {{base: demo, tile_encoder_weights: {weights}, slide_encoder: {{n_tokens: 8}}}}\n"
        "train: {epochs: 1, batch_size: 2, bf16: false}\n"
    )
    s1.write_text(f"data: {{packs: [{random_pack}]}}\n" + body, encoding="utf-8")
    res = CliRunner().invoke(train_command, ["stage1", "--config", str(s1), "--out", str(tmp_path / "bad")])
    assert res.exit_code != 0 and "re-run `wsi-llava train prepare`" in res.output

    pack = prepare_pack([world], tmp_path / "trained.pt", weights=weights, cache_dir=tmp_path / "cache")
    assert load_pack(pack)["encoder_id"] == enc.encoder_id
    s1.write_text(f"data: {{packs: [{pack}]}}\n" + body, encoding="utf-8")
    _train(["stage1", "--config", str(s1), "--out", str(tmp_path / "s1"), "--device", "cpu"])
    final = tmp_path / "s1" / "final"
    spec = ModelSpec.load(final)
    assert spec.tile_encoder.weights == "tile_encoder.safetensors"
    assert weights_sha256(final / "tile_encoder.safetensors") == weights_sha256(weights)


def test_tile_pack_errors_name_the_file(tmp_path: Path) -> None:
    from wsi_llava.train.tile_pack import load_tile_packs

    with pytest.raises(TrainError, match="prepare-tiles"):
        load_tile_packs([tmp_path / "nope.pt"])
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a pack")
    with pytest.raises(TrainError, match="bad.pt"):
        load_tile_packs([bad])
