"""The front ends' questions in the demo's training data: phrasings, answers, whole-annotation tiles."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from click.testing import CliRunner

from wsi_llava.synth.text import _CLASS_REPEAT, _PER_KIND, _PER_SLIDE, NECROSIS

ROOT = Path(__file__).resolve().parents[1]
#: the phrasing groups of ``FRONT_END_QUESTIONS`` that ``check_presets`` judges under another kind
JUDGED_AS = {"describe": "tissue"}


def _check_presets() -> ModuleType:
    """``training/check_presets.py`` as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("check_presets", ROOT / "training" / "check_presets.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_front_end_question_is_trained_under_the_kind_it_is_judged_by() -> None:
    from wsi_llava.synth.text import FRONT_END_QUESTIONS

    cp = _check_presets()
    asked = cp.front_end_questions()
    assert len(asked["region"]) >= 10 and len(asked["slide"]) >= 8
    for scope, questions in asked.items():
        for q, where in questions:
            groups = [g for g, phrasings in FRONT_END_QUESTIONS.items() if q in phrasings]
            assert len(groups) == 1, (scope, q, where, groups)
    for group, phrasings in FRONT_END_QUESTIONS.items():
        assert len(set(phrasings)) == len(phrasings) >= 3, group
        for q in phrasings:
            assert cp.question_kind(q) == JUDGED_AS.get(group, group), (q, group)


def test_preset_rows_answer_by_the_rules_they_are_judged_by(world: Path) -> None:
    from wsi_llava.eval.bench import ItemRegions, load_bench
    from wsi_llava.synth.world import load_manifest

    cp = _check_presets()
    manifest = load_manifest(world)
    entries = {s.path: s for s in manifest.slides}
    bench = load_bench(world)
    regions = ItemRegions(bench.root)
    items = [it for it in bench.items if it.task == "Preset_Questions"]
    asked: Counter[tuple[str, str]] = Counter()
    slide_kinds: Counter[str] = Counter()
    for it in items:
        entry = entries[it.image]
        kind = cp.question_kind(it.question)
        assert it.kind == "open", it.answer
        region = regions.region(it)
        if it.annotation_id is None:
            assert region is None
            assert cp.judge_slide(it.answer, kind, entry)["correct"], (it.question, it.answer)
            slide_kinds[kind] += 1
            continue
        annotation = {r.id: r for r in entry.regions}[it.annotation_id]
        assert region.points == annotation.points and region.holes == annotation.holes  # the whole polygon
        cls = cp.region_class(annotation)
        verdict = cp.judge_region(it.answer, kind, cls, entry)
        assert verdict["correct"], (cls, it.question, it.answer, verdict)
        asked[(it.annotation_id, kind)] += 1
    kinds = ("tissue", "diagnosis", "grade", "tumour?", "necrosis?")
    for entry in manifest.slides:
        for r in entry.regions:
            assert all(asked[(r.id, k)] >= 1 for k in kinds), r.name
            assert asked[(r.id, "tissue")] >= 2  # "describe" and "what tissue" phrasings
    assert slide_kinds.keys() >= set(kinds) | {"tissue+diagnosis"}
    assert sum(slide_kinds.values()) == len(manifest.slides) * 7 * _PER_SLIDE
    necrotic = [r.id for e in manifest.slides for r in e.regions if cp.region_class(r) == "necrosis"]
    assert necrotic
    repeat = _CLASS_REPEAT[NECROSIS]
    assert repeat > 1
    for rid in necrotic:  # the rare class is asked more often
        assert asked[(rid, "necrosis?")] == repeat * _PER_KIND["necrosis?"]
        assert asked[(rid, "tissue")] == repeat * (_PER_KIND["describe"] + _PER_KIND["tissue"])


def _pixels_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_worker_processes_write_the_same_world(world: Path, tmp_path: Path) -> None:
    from wsi_llava.synth import generate_world, load_manifest

    again = generate_world(tmp_path / "w", 2, seed=1, size=(2048, 2048), workers=2)
    first = load_manifest(world)
    assert [s.model_dump() for s in again.slides] == [s.model_dump() for s in first.slides]
    assert again.bench == first.bench
    for s in first.slides:
        assert _pixels_sha(world / s.path) == _pixels_sha(tmp_path / "w" / s.path)
    for rel in first.bench.values():
        assert json.loads((world / rel).read_text()) == json.loads((tmp_path / "w" / rel).read_text())


def test_pack_gives_whole_annotation_rows_the_tiles_the_front_ends_select(
    world: Path, tmp_path: Path
) -> None:
    from wsi_llava.errors import RegionError
    from wsi_llava.slide import open_slide
    from wsi_llava.slide.tiling import make_tile_grid, select_tiles
    from wsi_llava.synth.world import load_manifest
    from wsi_llava.train.data import load_pack, prepare_pack

    pack = load_pack(prepare_pack([world], tmp_path / "pack.pt", cache_dir=tmp_path / "cache"))
    for entry in load_manifest(world).slides:
        key = f"{world.name}/{entry.stem}"
        with open_slide(world / entry.path) as reader:
            grid = make_tile_grid(reader, target_mpp=0.5, tile_size=256)
        polygons = set()
        for r in entry.regions:
            try:
                polygons.add(tuple(int(t) for t in select_tiles(grid, r)))
            except RegionError:
                continue
        rows = [s for s in pack["samples"] if s["slide"] == key and s["task"] == "Preset_Questions"]
        whole = {tuple(s["tiles"]) for s in rows if s["tiles"] is not None}
        assert whole == polygons
        assert sum(s["tiles"] is None for s in rows) == 7 * _PER_SLIDE  # the slide questions: every tile
        boxes = [
            s["tiles"] for s in pack["samples"] if s["slide"] == key and s["task"] == "Region_Description"
        ]
        assert boxes and max(len(t) for t in boxes) < max(len(t) for t in whole)


# --- stage 3 going on with the adapter of a stage-3 checkpoint ----------------------------------------
def _train(args: list[str]) -> None:
    from wsi_llava.train.command import train_command

    res = CliRunner().invoke(train_command, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output


def _adapter(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(folder / "lora" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def tiny_stage1(tmp_path_factory) -> tuple[Path, Path]:
    """A feature pack of a 2-slide world and a stage-1 checkpoint on a 2-layer Llama (CPU-fast)."""
    from kits.llm import save_tiny_llm, smollm2_tokenizer

    from wsi_llava.synth import generate_world
    from wsi_llava.train.data import prepare_pack

    d = tmp_path_factory.mktemp("from_base")
    generate_world(d / "world", 2, seed=5, size=(2048, 2048), split="train")
    pack = prepare_pack([d / "world"], d / "pack.pt", cache_dir=d / "cache")
    save_tiny_llm(d / "llm", smollm2_tokenizer(), tie_word_embeddings=True)
    (d / "s1.yaml").write_text(
        f"data: {{packs: [{pack}]}}\nmodel: {{base: demo, llm: {d / 'llm'}, slide_encoder: {{n_tokens: 8}}}}\n"
        "optim: {lr: 1.0e-3, warmup_ratio: 0.0}\ntrain: {max_steps: 1, batch_size: 2, bf16: false}\n"
    )
    _train(["stage1", "--config", str(d / "s1.yaml"), "--out", str(d / "s1"), "--device", "cpu"])
    return pack, d / "s1" / "final"


def _stage3(d: Path, pack: Path, base: Path, name: str, lora: str) -> Path:
    cfg = d / f"{name}.yaml"
    cfg.write_text(
        f"data: {{packs: [{pack}], max_length: 64, tasks: [Preset_Questions]}}\nmodel: {{base: {base}}}\n"
        f"lora: {lora}\noptim: {{lr: 5.0e-3, projector_lr: 5.0e-3, warmup_ratio: 0.0}}\n"
        "train: {max_steps: 3, batch_size: 2, bf16: false}\n"
    )
    _train(["stage3", "--config", str(cfg), "--out", str(d / name), "--device", "cpu"])
    return d / name / "final"


def test_stage3_from_base_trains_the_base_adapter(tiny_stage1: tuple[Path, Path], tmp_path: Path) -> None:
    from wsi_llava.model.checkpoint import load_checkpoint
    from wsi_llava.train.config import TrainError

    pack, stage1 = tiny_stage1
    first = _stage3(tmp_path, pack, stage1, "first", "{r: 2, alpha: 4}")
    again = _stage3(tmp_path, pack, first, "again", "{from_base: true, r: 8}")
    a, b = _adapter(first), _adapter(again)
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)  # the same r = 2 adapter
    lora_b = [k for k in a if "lora_B" in k]
    assert lora_b and all(a[k].abs().sum() > 0 for k in lora_b)  # trained in the first run
    assert all(not a[k].equal(b[k]) for k in lora_b)  # and again in the second
    assert json.loads((again / "lora" / "adapter_config.json").read_text())["r"] == 2
    load_checkpoint(again, device="cpu", dtype="float32")
    with pytest.raises(TrainError, match="no LoRA adapter"):
        from wsi_llava.train.config import load_config
        from wsi_llava.train.lm import run_lm_stage
        from wsi_llava.train.loop import Dist

        cfg = tmp_path / "bad.yaml"
        cfg.write_text(
            f"data: {{packs: [{pack}], max_length: 64}}\nmodel: {{base: {stage1}}}\nlora: {{from_base: true}}\n"
            "train: {max_steps: 1, batch_size: 2, bf16: false}\n"
        )
        run_lm_stage(load_config(cfg, "stage3"), tmp_path / "bad", Dist())


@pytest.mark.parametrize("script", ["check_presets.py", "check_demo.py"])
def test_training_checks_name_the_cache_as_ask_does(script: str) -> None:
    """``--cache DIR`` as on ``ask`` / ``eval`` / ``train prepare``; the old ``--cache-dir`` works but is not listed."""
    shown = subprocess.run(
        [sys.executable, str(ROOT / "training" / script), "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--cache CACHE" in shown and "--cache-dir" not in shown
