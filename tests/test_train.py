"""The three training stages on a tiny synthetic world (real models, a few CPU steps each)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from kits.llm import save_tiny_llm, smollm2_tokenizer

from wsi_llava.train.command import train_command
from wsi_llava.train.config import TrainError
from wsi_llava.train.loop import list_checkpoints, read_log


@pytest.fixture(scope="module")
def pack(tmp_path_factory) -> Path:
    from wsi_llava.synth import generate_world
    from wsi_llava.train.data import load_pack, prepare_pack

    root = tmp_path_factory.mktemp("train")
    generate_world(root / "world", 2, seed=5, size=(2048, 2048), split="train")
    out = prepare_pack([root / "world"], root / "pack.pt", cache_dir=root / "cache")
    p = load_pack(out)
    assert len(p["slides"]) == 2 and p["encoder_id"].startswith("demo-vit:")
    assert any(s["tiles"] for s in p["samples"])  # region rows resolved to tile indices
    return out


def test_prepare_takes_cache_and_its_hidden_old_spelling(pack: Path, tmp_path):
    """``train prepare --cache`` (as ask / eval) puts the features there; ``--cache-dir`` still does, unlisted."""
    from wsi_llava.features.cache import FeatureCache

    world = pack.parent / "world"
    shown = CliRunner().invoke(train_command, ["prepare", "--help"]).output
    assert "--cache " in shown and "--cache-dir" not in shown
    for flag in ("--cache", "--cache-dir"):
        cache = tmp_path / flag.strip("-")
        _train(["prepare", "--bench", str(world), "--out", str(tmp_path / f"{flag}.pt"), flag, str(cache)])
        assert (tmp_path / f"{flag}.pt").is_file() and len(FeatureCache(cache / "features").list()) == 2
    both = ["--cache", str(tmp_path / "a"), "--cache-dir", str(tmp_path / "b")]
    res = CliRunner().invoke(
        train_command, ["prepare", "--bench", str(world), "--out", str(tmp_path / "x.pt"), *both]
    )
    assert res.exit_code != 0 and "give --cache only" in res.output and not (tmp_path / "x.pt").exists()


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory) -> Path:
    """A 2-layer Llama with SmolLM2's tokenizer and chat template (real model code, CPU-fast)."""
    return save_tiny_llm(tmp_path_factory.mktemp("tiny_llm"), smollm2_tokenizer(), tie_word_embeddings=True)


def _cfg(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _train(args: list[str]) -> None:
    res = CliRunner().invoke(train_command, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_log(run / "log.jsonl") if "loss" in r and "event" not in r]


@pytest.fixture(scope="module")
def stage1(pack: Path, tiny_llm: Path, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("s1")
    cfg = _cfg(
        d / "s1.yaml",
        f"data: {{packs: [{pack}]}}\nmodel: {{base: demo, llm: {tiny_llm}, slide_encoder: {{n_tokens: 8}}}}\n"
        "optim: {lr: 1.0e-3, warmup_ratio: 0.0}\ntrain: {epochs: 4, batch_size: 2, bf16: false}\n",
    )
    _train(["stage1", "--config", str(cfg), "--out", str(d / "run"), "--device", "cpu"])
    return d / "run"


def test_stage1_contrastive_loss_falls(stage1: Path, tiny_llm: Path) -> None:
    losses = _losses(stage1)
    assert len(losses) == 4 and losses[-1] < losses[0]
    final = stage1 / "final"
    assert (final / "slide_encoder.safetensors").is_file() and (final / "stage1_heads.safetensors").is_file()
    from wsi_llava.model.spec import ModelSpec

    spec = ModelSpec.load(final)
    assert spec.demo and spec.n_visual_tokens == 8
    assert spec.projector.out_dim == 64 and Path(spec.llm.source).name == tiny_llm.name


@pytest.fixture(scope="module")
def stage2(pack: Path, stage1: Path, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("s2")
    cfg = _cfg(
        d / "s2.yaml",
        f"data: {{packs: [{pack}], max_length: 80}}\nmodel: {{base: {stage1 / 'final'}}}\n"
        "optim: {lr: 2.0e-3, warmup_ratio: 0.0, scheduler: constant}\n"
        "train: {epochs: 4, batch_size: 2, bf16: false}\n",
    )
    _train(["stage2", "--config", str(cfg), "--out", str(d / "run"), "--device", "cpu"])
    return d / "run"


def test_stage2_projector_loss_falls(stage2: Path) -> None:
    losses = _losses(stage2)
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert not (stage2 / "final" / "lora").exists()


def _stage3_cfg(
    d: Path,
    pack: Path,
    base: Path,
    extra: str = "",
    top: str = "",
    tasks: str = "Morphology_TF_question",
    model: str = "",
) -> Path:
    return _cfg(
        d / "s3.yaml",
        f"data: {{packs: [{pack}], max_length: 64, tasks: [{tasks}]}}\n{top}"
        f"model: {{base: {base}{model}}}\nlora: {{r: 2, alpha: 4, dropout: 0.1}}\n"
        "optim: {lr: 2.0e-3, projector_lr: 2.0e-3, warmup_ratio: 0.0}\n"
        f"train: {{max_steps: 4, epochs: 4, batch_size: 3, bf16: false, save_every: 2{extra}}}\n",
    )


def test_stage3_lora_trains_resumes_and_loads(pack: Path, stage2: Path, tmp_path: Path) -> None:
    cfg = _stage3_cfg(tmp_path, pack, stage2 / "final")
    full = tmp_path / "full"
    _train(["stage3", "--config", str(cfg), "--out", str(full), "--device", "cpu"])
    losses = _losses(full)
    assert len(losses) == 4 and losses[-1] < losses[0]
    # killed after step 2, then resumed: the same loss curve
    part = tmp_path / "part"
    _train(["stage3", "--config", str(cfg), "--out", str(part), "--device", "cpu", "--stop-after", "2"])
    assert not (part / "final").exists() and [p.name for p in list_checkpoints(part)] == ["step_0000002"]
    with pytest.raises(TrainError, match="--resume"):
        from wsi_llava.train.config import load_config
        from wsi_llava.train.lm import run_lm_stage
        from wsi_llava.train.loop import Dist

        run_lm_stage(load_config(cfg, "stage3"), part, Dist())
    _train(["stage3", "--config", str(cfg), "--out", str(part), "--device", "cpu", "--resume"])
    assert _losses(part) == pytest.approx(losses, rel=1e-5, abs=1e-6)
    # the result is a checkpoint the library loads, with its LoRA
    from wsi_llava.model.checkpoint import load_checkpoint

    final = full / "final"
    assert (final / "lora" / "adapter_config.json").is_file()
    model = load_checkpoint(final, device="cpu", dtype="float32")
    assert model.spec.demo and not model.spec.untrained
    import torch

    text = model.generate_text(
        "What is the diagnosis?", torch.zeros(8, model.spec.projector.in_dim), max_new_tokens=3
    )
    assert isinstance(text, str)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(
    pack: Path, stage2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from wsi_llava.train import loop

    real = loop.train_loop
    calls = {"n": 0}

    def poisoned(task, *a, **kw):
        inner = task.loss_sum

        def loss_sum(idx):
            calls["n"] += 1
            out = inner(idx)
            return out * torch.tensor(float("nan")) if calls["n"] > 2 else out

        task.loss_sum = loss_sum
        return real(task, *a, **kw)

    import wsi_llava.train.lm as lm

    monkeypatch.setattr(lm, "train_loop", poisoned)
    cfg = _stage3_cfg(tmp_path, pack, stage2 / "final")
    res = CliRunner().invoke(train_command, ["stage3", "--config", str(cfg), "--out", str(tmp_path / "r")])
    assert res.exit_code != 0
    assert "loss is nan at step 3" in res.output and "step_0000002" in res.output
    assert [p.name for p in list_checkpoints(tmp_path / "r")] == ["step_0000002"]


def test_sample_loss_weighting_differs_from_token_weighting() -> None:
    import torch

    from wsi_llava.train.lm import answer_loss_sum

    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    # sample 0: one answer token (a letter); sample 1: four answer tokens (a longer answer)
    labels = torch.full((2, 6), -100)
    labels[0, 2] = 3
    labels[1, 1:5] = torch.tensor([1, 4, 7, 9])
    tok = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    l0, l1 = tok[0, 2], tok[1, 1:5]
    token = answer_loss_sum(logits, labels, "token")
    sample = answer_loss_sum(logits, labels, "sample")
    assert token.item() == pytest.approx((l0 + l1.sum()).item(), rel=1e-6)
    assert sample.item() == pytest.approx((l0 + l1.mean()).item(), rel=1e-6)
    # the loop divides by 5 answer tokens (token) or 2 samples (sample): different means
    assert abs(token.item() / 5 - sample.item() / 2) > 1e-3
    assert answer_loss_sum(logits, torch.full((2, 6), -100), "sample").item() == 0.0


def test_stage3_sample_weighting_trains(pack: Path, stage2: Path, tmp_path: Path) -> None:
    cfg = _stage3_cfg(
        tmp_path,
        pack,
        stage2 / "final",
        top="loss_weighting: sample\n",
        tasks="Morphology_TF_question, Region_Description",
        model=', region_prompt: "In the region: {question}"',
    )
    _train(["stage3", "--config", str(cfg), "--out", str(tmp_path / "run"), "--device", "cpu"])
    losses = _losses(tmp_path / "run")
    assert len(losses) == 4 and losses[-1] < losses[0]
    # the cue region questions were trained with is the one the checkpoint is asked with
    from wsi_llava.model.spec import ModelSpec

    spec = ModelSpec.load(tmp_path / "run" / "final")
    assert spec.model_question("Why?", "region") == "In the region: Why?"


def test_two_process_data_parallel_matches_one_process(pack: Path, stage1: Path, tmp_path: Path) -> None:
    """torchrun with 2 CPU processes (gloo), batch 1 each, follows the loss curve of 1 process with batch 2."""
    import os
    import subprocess
    import sys

    def cfg(name: str, batch: int) -> Path:
        return _cfg(
            tmp_path / f"{name}.yaml",
            f"data: {{packs: [{pack}], max_length: 80}}\n"
            f"model: {{base: {stage1 / 'final'}}}\n"
            "optim: {lr: 2.0e-3, warmup_ratio: 0.0, scheduler: constant}\n"
            f"train: {{epochs: 3, batch_size: {batch}, bf16: false, group_by_length: false}}\n",
        )

    _train(["stage2", "--config", str(cfg("one", 2)), "--out", str(tmp_path / "one"), "--device", "cpu"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "wsi_llava.train", "stage2", "--config", str(cfg("two", 1)), "--out", str(tmp_path / "two"),
         "--device", "cpu"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 3
    assert all(abs(a - b) <= 1e-4 * max(1.0, abs(a)) for a, b in zip(one, two, strict=True)), (one, two)
    start = read_log(tmp_path / "two" / "log.jsonl")[0]
    assert start["world_size"] == 2 and start["global_batch"] == 2


def test_option_permutations_keep_the_right_option(pack: Path) -> None:
    from wsi_llava.eval.bench import parse_options
    from wsi_llava.train.config import DataConfig
    from wsi_llava.train.data import load_train_data

    base = load_train_data(DataConfig(packs=[pack])).samples
    more = load_train_data(DataConfig(packs=[pack], option_permutations=3)).samples
    mcq = [s for s in base if s.kind == "close" and parse_options(s.question)]
    assert mcq and len(more) == len(base) + 3 * len(mcq)
    assert more[: len(base)] == base  # originals first, untouched
    copies = more[len(base) :]
    for i, s in enumerate(mcq):
        right = parse_options(s.question)[s.answer]
        orders = {c.question for c in copies[3 * i : 3 * i + 3]} | {s.question}
        assert len(orders) == 4  # three new orders
        for c in copies[3 * i : 3 * i + 3]:
            assert (c.slide, c.task, c.tiles) == (s.slide, s.task, s.tiles)
            assert parse_options(c.question)[c.answer] == right
            assert c.question.split(" A) ")[0] == s.question.split(" A) ")[0]
    assert not [c for c in copies if c.answer in ("Yes", "No")]  # yes/no questions are not copied
