"""``train.strategy: fsdp`` (FSDP2 over gloo on CPU): stage 3 with LoRA on a tiny Llama, real code.

Two CPU processes (batch 1 each), killed after step 2 and resumed from their sharded checkpoint,
follow the loss curve of one plain process (batch 2); the final model is written in the usual format,
holds the one-process run's weights and loads with ``load_checkpoint``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from wsi_llava.train.command import train_command
from wsi_llava.train.config import TrainError
from wsi_llava.train.loop import list_checkpoints, read_log


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, Path]:
    """``(bench folder, base checkpoint)``: WSI-Bench-layout rows with .pt visual tokens; a 2-layer Llama
    with a byte-level BPE tokenizer trained here (no download, no slide reading)."""
    import json

    import torch
    from kits.llm import save_tiny_llm, train_bpe
    from transformers import PreTrainedTokenizerFast

    from wsi_llava.model.checkpoint import save_checkpoint
    from wsi_llava.model.projector import build_projector
    from wsi_llava.model.spec import LLMSpec, ModelSpec, ProjectorSpec
    from wsi_llava.model.templates import VICUNA_SYSTEM

    root = tmp_path_factory.mktemp("fsdp")
    (root / "features").mkdir()
    (root / "bench").mkdir()
    g = torch.Generator().manual_seed(0)
    organs = ["lung", "breast", "colon", "kidney"]
    rows, texts = [], [VICUNA_SYSTEM, "USER: ASSISTANT: </s>"]
    for i in range(8):
        torch.save(torch.randn(8, 16, generator=g) + i % 4, root / "features" / f"s{i}.pt")
        q, a = "What organ is this slide from?", f"This slide shows {organs[i % 4]} tissue."
        rows.append({"question_id": f"Description_{i}_1", "image": f"s{i}.pt", "question": "<image>\n" + q,
                     "T-answer": a, "metadata": "description"})  # fmt: skip
        texts += [q, a]
    (root / "bench" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tk = train_bpe(texts * 4, ["<unk>", "<s>", "</s>", "<pad>"])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    # the shared (tied) table must sit in one FSDP unit
    save_tiny_llm(root / "llm", tok, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    spec = ModelSpec(
        llm=LLMSpec(source=str(root / "llm")),
        projector=ProjectorSpec(in_dim=16, out_dim=64),
        slide_encoder=None,
        n_visual_tokens=8,
        template="vicuna_v1",
        name="fsdp-test",
    )
    proj = build_projector(spec.projector.type, 16, 64)
    model = SimpleNamespace(
        spec=spec, projector=proj, slide_encoder=None, tile_encoder=None, llm=None, tokenizer=None,
        checkpoint_dir=None,
    )  # fmt: skip
    save_checkpoint(model, root / "base")
    return root, root / "base"


def _cfg(path: Path, data: Path, base: Path, batch: int, strategy: str) -> Path:
    path.write_text(
        f"data: {{bench: [{data / 'bench'}], features: {data / 'features'}, max_length: 160}}\n"
        f"model: {{base: {base}}}\nlora: {{r: 2, alpha: 4, dropout: 0.0}}\n"
        "optim: {lr: 2.0e-3, projector_lr: 1.0e-3, warmup_ratio: 0.0}\n"
        f"train: {{max_steps: 4, epochs: 2, batch_size: {batch}, bf16: false, save_every: 2, "
        f"group_by_length: false, strategy: {strategy}}}\n",
        encoding="utf-8",
    )
    return path


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_log(run / "log.jsonl") if "loss" in r and "event" not in r]


def _torchrun(args: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "wsi_llava.train", *args, "--device", "cpu"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]


def test_strategy_key_is_validated(tmp_path: Path) -> None:
    from wsi_llava.train.config import LoopConfig, OptimConfig, load_config
    from wsi_llava.train.loop import Dist, Task, train_loop

    assert LoopConfig().strategy == "ddp"
    paper = load_config(Path(__file__).parents[1] / "configs" / "paper" / "stage3_fsdp.yaml", "stage3")
    assert paper.train.strategy == "fsdp" and paper.train.batch_size * paper.train.grad_accum * 8 == 128
    bad = tmp_path / "s3.yaml"
    bad.write_text("data: {packs: [p.pt]}\ntrain: {strategy: zero3}\n", encoding="utf-8")
    with pytest.raises(TrainError, match=r"s3.yaml: invalid stage3 config: train.strategy"):
        load_config(bad, "stage3")
    s1 = tmp_path / "s1.yaml"
    s1.write_text("data: {packs: [p.pt]}\ntrain: {strategy: fsdp}\n", encoding="utf-8")
    with pytest.raises(TrainError, match=r"s1.yaml: invalid stage1 config: .*fsdp shards the LLM of stage2"):
        load_config(s1, "stage1")
    # stages without an LLM to shard refuse fsdp before any work (the loop checks too)
    task = Task(
        stage="stage1", lengths=[1, 1], trainable={}, param_groups=[], count=lambda m: 1.0,
        loss_sum=lambda m: None, autocast=lambda: None,
    )  # fmt: skip
    with pytest.raises(TrainError, match="stage1: train.strategy fsdp shards the LLM of stage2 and stage3"):
        train_loop(task, LoopConfig(strategy="fsdp"), OptimConfig(), tmp_path / "r", Dist())


def test_two_process_fsdp_matches_ddp_resumes_and_exports(base: tuple[Path, Path], tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from wsi_llava.model.checkpoint import load_checkpoint
    from wsi_llava.train.config import load_config
    from wsi_llava.train.lm import run_lm_stage
    from wsi_llava.train.loop import Dist

    data, start = base
    one_cfg = _cfg(tmp_path / "one.yaml", data, start, 2, "ddp")
    one = tmp_path / "one"
    res = CliRunner().invoke(
        train_command,
        ["stage3", "--config", str(one_cfg), "--out", str(one), "--device", "cpu"],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    ref = _losses(one)
    assert len(ref) == 4 and ref[-1] < ref[0]
    # 2 processes x batch 1, killed after step 2: the checkpoint is sharded (one DCP file per rank)
    two_cfg = str(_cfg(tmp_path / "two.yaml", data, start, 1, "fsdp"))
    run = tmp_path / "two"
    _torchrun(["stage3", "--config", two_cfg, "--out", str(run), "--stop-after", "2"])
    (ck,) = list_checkpoints(run)
    assert ck.name == "step_0000002" and not (run / "final").exists()
    assert len(list((ck / "dcp").glob("*.distcp"))) == 2
    assert "params" not in torch.load(ck / "state.pt", weights_only=False)
    with pytest.raises(TrainError, match="saved with train.strategy fsdp, now ddp"):
        run_lm_stage(load_config(one_cfg, "stage3"), run, Dist(), resume=True)
    # resumed: the whole curve is the one-process curve (FSDP reduce-scatter vs one process: ~1e-7 apart)
    _torchrun(["stage3", "--config", two_cfg, "--out", str(run), "--resume"])
    got = _losses(run)
    assert len(got) == 4 and all(
        abs(a - b) <= 2e-5 * max(1.0, abs(a)) for a, b in zip(ref, got, strict=True)
    ), (
        ref,
        got,
    )
    first = read_log(run / "log.jsonl")[0]
    assert first["world_size"] == 2 and first["global_batch"] == 2
    # final/ is the usual format: the same files and tensors as the one-process run's
    for name in ("projector.safetensors", "lora/adapter_model.safetensors"):
        a, b = load_file(str(one / "final" / name)), load_file(str(run / "final" / name))
        assert a.keys() == b.keys() and a
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-4), (name, k, (a[k] - b[k]).abs().max())
    model = load_checkpoint(run / "final", device="cpu", dtype="float32")
    assert model.spec.lora == "lora" and not model.spec.untrained
    text = model.generate_text("What organ is this slide from?", torch.zeros(8, 16), max_new_tokens=2)
    assert isinstance(text, str)
