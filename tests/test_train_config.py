"""Training configs and data plumbing: typos, missing files, batching (no model training here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from wsi_llava.train.command import train_command
from wsi_llava.train.config import Stage1Config, Stage3Config, TrainError, load_config
from wsi_llava.train.data import epoch_batches, iter_steps, load_train_data, shard, total_steps

REPO = Path(__file__).resolve().parents[1]


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_configs_validate() -> None:
    for stage in ("stage1", "stage2", "stage3"):
        cfg = load_config(REPO / "configs" / "demo" / f"{stage}.yaml", stage)
        assert cfg.stage == stage
    paper = load_config(REPO / "configs" / "paper" / "stage3.yaml", "stage3")
    assert isinstance(paper, Stage3Config)
    assert (paper.lora.r, paper.lora.alpha, paper.lora.dropout) == (128, 256, 0.05)
    assert (paper.optim.lr, paper.optim.projector_lr, paper.train.epochs) == (2e-4, 2e-5, 3)
    assert paper.train.batch_size * paper.train.grad_accum == 128
    assert paper.model.template == "vicuna_v1" and paper.data.max_length == 2048
    assert paper.optim.scheduler == "cosine" and paper.optim.warmup_ratio == 0.03 and paper.train.bf16


def test_typo_names_file_and_key(tmp_path: Path) -> None:
    cfg = _write(tmp_path / "s3.yaml", "data: {packs: [p.pt]}\noptim: {lrr: 0.1}\n")
    with pytest.raises(TrainError) as e:
        load_config(cfg, "stage3")
    assert "s3.yaml" in str(e.value) and "optim.lrr" in str(e.value)


def test_bad_configs(tmp_path: Path) -> None:
    with pytest.raises(TrainError, match="no such file"):
        load_config(tmp_path / "none.yaml", "stage1")
    with pytest.raises(TrainError, match="not valid YAML"):
        load_config(_write(tmp_path / "a.yaml", "data: [unclosed\n"), "stage1")
    with pytest.raises(TrainError, match="stage2 config, not stage3"):
        load_config(_write(tmp_path / "b.yaml", "stage: stage2\ndata: {packs: [p.pt]}\n"), "stage3")
    with pytest.raises(TrainError, match="data.features"):
        load_config(_write(tmp_path / "c.yaml", "data: {bench: [b]}\n"), "stage3")
    with pytest.raises(TrainError, match="train.batch_size"):
        load_config(_write(tmp_path / "d.yaml", "data: {packs: [p.pt]}\ntrain: {batch_size: 0}\n"), "stage1")


def test_relative_paths_resolve_against_config_folder(tmp_path: Path) -> None:
    sub = tmp_path / "cfgs"
    sub.mkdir()
    (sub / "p.pt").write_bytes(b"")
    cfg = load_config(_write(sub / "s1.yaml", "data: {packs: [p.pt]}\n"), "stage1")
    assert isinstance(cfg, Stage1Config)
    assert cfg.data.packs == [sub.resolve() / "p.pt"]


def test_cli_reports_config_errors(tmp_path: Path) -> None:
    cfg = _write(tmp_path / "s2.yaml", "data: {packs: [p.pt]}\ntrain: {epochz: 1}\n")
    res = CliRunner().invoke(train_command, ["stage2", "--config", str(cfg), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0
    assert "train.epochz" in res.output and "s2.yaml" in res.output
    assert "Traceback" not in res.output


def test_missing_packs_are_listed(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path / "s.yaml", "data: {packs: [a.pt, b.pt]}\n"), "stage3")
    with pytest.raises(TrainError) as e:
        load_train_data(cfg.data)
    assert "a.pt" in str(e.value) and "b.pt" in str(e.value)


def test_missing_official_features_are_listed_up_front(tmp_path: Path) -> None:
    import torch

    bench = tmp_path / "bench"
    bench.mkdir()
    rows = [
        {
            "id": f"s{i}",
            "image": f"s{i}.pt",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is the grade?"},
                {"from": "gpt", "value": "G2"},
            ],
        }
        for i in range(3)
    ]
    (bench / "Grading_train.json").write_text(json.dumps(rows), encoding="utf-8")
    feats = tmp_path / "features"
    feats.mkdir()
    torch.save(torch.zeros(4, 8), feats / "s1.pt")
    cfg = load_config(
        _write(tmp_path / "s.yaml", f"data: {{bench: [{bench}], features: {feats}}}\n"), "stage3"
    )
    with pytest.raises(TrainError) as e:
        load_train_data(cfg.data)
    msg = str(e.value)
    assert "2 feature file(s) missing" in msg and "s0.pt" in msg and "s2.pt" in msg
    torch.save(torch.zeros(4, 8), feats / "s0.pt")
    torch.save(torch.ones(4, 8), feats / "s2.pt")
    data = load_train_data(cfg.data)
    assert len(data.samples) == 3 and data.samples[0].answer == "G2"
    assert data.features_for(data.samples[2]).features.load().sum() == 32


def test_batches_deterministic_grouped_and_sharded() -> None:
    lengths = [(i * 37) % 101 for i in range(64)]
    a = epoch_batches(lengths, 8, seed=1, epoch=0)
    assert a == epoch_batches(lengths, 8, seed=1, epoch=0)
    assert a != epoch_batches(lengths, 8, seed=1, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(64))
    # length grouping: batches are far more homogeneous than random ones
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in a)
    plain = epoch_batches(lengths, 8, seed=1, epoch=0, group_by_length=False)
    assert spread < sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in plain)
    # two ranks x micro-batches of 2 cover one global batch exactly once
    parts = [m for r in range(2) for m in shard(a[0], r, 2, 2)]
    assert sorted(i for m in parts for i in m) == sorted(a[0]) and all(len(m) == 2 for m in parts)
    # resuming at step k replays the same batches
    full = list(iter_steps(lengths, 8, 3, 0, 20, True))
    assert full[13:] == list(iter_steps(lengths, 8, 3, 13, 20, True))
    assert total_steps(64, 8, 2.5, None) == 20 and total_steps(64, 8, 3, 5) == 5
    with pytest.raises(TrainError, match="fewer than one global batch"):
        total_steps(4, 8, 1, None)
