"""User models end to end: register real parts once, then name them in every command.

Parts are written at test time in their producers' layouts (a Prov-GigaPath timm hub folder with
``slide_encoder.pth`` beside its weights, a merged LLaVA-1.5 folder with sharded safetensors) and also
placed in a Hugging Face hub cache to be named by repo id. Every command runs as a user types it, in a
fresh process; bad input must give one ``Error:`` line and leave nothing half-registered or featurized.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from kits.cli import assert_user_error, run_cli
from kits.parts import (
    make_gigapath_folder,
    make_paper_parts,
    make_slide_encoder_pth,
    put_in_hub_cache,
)

from wsi_llava.errors import ModelError
from wsi_llava.sources import canonical_source, resolve_source

pytestmark = pytest.mark.integration

Q = "What is the diagnosis?"


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parts")
    p = make_paper_parts(root)
    hub = root / "hub"
    put_in_hub_cache(hub, "prov-gigapath/prov-gigapath", p["tile_encoder"])
    put_in_hub_cache(hub, "Lucas-yuc/wsi-llava-v1.5-7b-e1", p["llava"])
    return {**p, "hub": hub, "root": root}


def _env(tmp_path: Path, parts) -> dict[str, str]:
    return {"WSI_LLAVA_HOME": str(tmp_path / "home"), "HF_HUB_CACHE": str(parts["hub"])}


def test_sources_local_paths_and_cached_repo_ids(parts, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(parts["hub"]))
    assert canonical_source(parts["llava"]) == str(parts["llava"].resolve())
    assert canonical_source("prov-gigapath/prov-gigapath") == "hf://prov-gigapath/prov-gigapath"
    snap = resolve_source("hf://prov-gigapath/prov-gigapath/slide_encoder.pth")
    assert snap.name == "slide_encoder.pth" and snap.is_symlink()
    with pytest.raises(
        ModelError, match=r"'prov-gigapath/missing'.*not in the local Hugging Face cache.*hf download"
    ):
        resolve_source("hf://prov-gigapath/missing")
    with pytest.raises(ModelError, match="no such file or folder, and not a Hugging Face repo id"):
        canonical_source("./no/such/folder")


def test_add_list_check_ask_describe_remove(parts, tmp_path, world, shared_cache):
    env = _env(tmp_path, parts)
    cache = tmp_path / "cache"
    out = run_cli(
        "models", "add", "wsi-llava-e1", "--llava", "Lucas-yuc/wsi-llava-v1.5-7b-e1",
        "--tile-encoder", "prov-gigapath/prov-gigapath", cache=cache, env=env,
    )  # fmt: skip
    assert "registered wsi-llava-e1" in out.stdout and "96-d = slide encoder input 96-d" in out.stdout
    spec = json.loads((tmp_path / "home" / "models" / "wsi-llava-e1" / "wsi_llava.json").read_text())
    assert spec["llm"] == {"source": "hf://Lucas-yuc/wsi-llava-v1.5-7b-e1", "format": "llava", "base": None}
    assert spec["tile_encoder"]["source"] == "hf://prov-gigapath/prov-gigapath"
    assert spec["slide_encoder_weights"] == "hf://prov-gigapath/prov-gigapath/slide_encoder.pth"
    assert spec["slide_encoder"]["pad_to"] == 1024 and spec["slide_encoder"]["n_tokens"] == 576

    listed = json.loads(run_cli("models", "--json", cache=cache, env=env).stdout)
    entry = {m["name"]: m for m in listed["models"]}["wsi-llava-e1"]
    assert entry["kind"] == "user" and entry["resolves"] is True
    assert "every part is in place" in run_cli("models", "check", "wsi-llava-e1", cache=cache, env=env).stdout

    slide = world / "slides" / "slide_000.tif"
    ans = json.loads(
        run_cli("ask", str(slide), Q, "--model", "wsi-llava-e1", "--json", "--max-new-tokens", "6",
                "--device", "cpu", cache=cache, env=env).stdout
    )  # fmt: skip
    assert ans["model"] == "wsi-llava-e1" and ans["demo"] is False and ans["notice"] is None
    assert len(ans["evidence"]["scores"]) > 0 and ans["timings"]["features"] > 0
    from wsi_llava.features.cache import FeatureCache

    ids = {e.encoder_id for e in FeatureCache(cache / "features").list()}
    assert ids and all("sha256-" in i and "random" not in i for i in ids), ids  # keyed by the real weights

    ann = world / "annotations" / "slide_000.geojson"
    out = run_cli("describe", "--slide", str(slide), "--geojson", str(ann), "-o", str(tmp_path / "out.geojson"),
                  "--model", "wsi-llava-e1", "--max-new-tokens", "4", "--device", "cpu", cache=cache, env=env)  # fmt: skip
    assert "described" in out.stdout and (tmp_path / "out.geojson").is_file()

    pt = tmp_path / "TCGA-XX.pt"
    torch.save(torch.randn(576, 1024), pt)
    ans = json.loads(
        run_cli("ask", "--features", str(pt), Q, "--model", "wsi-llava-e1", "--json", "--max-new-tokens", "4",
                "--device", "cpu", cache=cache, env=env).stdout
    )  # fmt: skip
    assert ans["slide"] == str(pt) and ans["evidence"]["scores"] == []

    report = tmp_path / "report"
    run_cli("eval", "--bench", str(world), "--model", "wsi-llava-e1", "--slides", str(world), "--out", str(report),
            "--tasks", "Region_choice,Report", "--limit", "1", "--max-new-tokens", "3", "--nlu", "none",
            "--device", "cpu", cache=cache, env=env)  # fmt: skip
    scores = json.loads((report / "scores.json").read_text())
    assert scores["model"] == "wsi-llava-e1", scores.get("model")
    assert len((report / "predictions.jsonl").read_text().splitlines()) == 2

    out = run_cli("models", "remove", "wsi-llava-e1", cache=cache, env=env)
    assert "removed" in out.stdout and not (tmp_path / "home" / "models" / "wsi-llava-e1").exists()
    assert parts["llava"].is_dir() and parts["tile_encoder"].is_dir()  # the weights stay where they were


def test_bad_registrations_write_nothing(parts, tmp_path):
    env = _env(tmp_path, parts)
    cache = tmp_path / "cache"
    home = tmp_path / "home" / "models"
    base = ["models", "add"]
    out = run_cli(*base, "demo", "--llava", str(parts["llava"]), "--tile-encoder", str(parts["tile_encoder"]),
                  cache=cache, env=env, check=False)  # fmt: skip
    assert_user_error(out, "taken by a built-in")
    out = run_cli(*base, "x", "--llava", "Nobody/not-cached", "--tile-encoder", str(parts["tile_encoder"]),
                  cache=cache, env=env, check=False)  # fmt: skip
    assert_user_error(out, "'Nobody/not-cached'", "hf download Nobody/not-cached")
    out = run_cli(*base, "x", "--llava", str(parts["tile_encoder"]), "--tile-encoder", str(parts["tile_encoder"]),
                  cache=cache, env=env, check=False)  # fmt: skip
    assert_user_error(out, "not a LLaVA checkpoint")
    wrong = make_slide_encoder_pth(tmp_path / "wrong" / "slide_encoder.pth", in_dim=128)
    out = run_cli(*base, "x", "--llava", str(parts["llava"]), "--tile-encoder", str(parts["tile_encoder"]),
                  "--slide-encoder", str(wrong), cache=cache, env=env, check=False)  # fmt: skip
    assert_user_error(out, "96-d features but the slide encoder takes 128-d")
    lonely = make_gigapath_folder(tmp_path / "lonely")  # no slide_encoder.pth beside it
    out = run_cli(*base, "x", "--llava", str(parts["llava"]), "--tile-encoder", str(lonely),
                  cache=cache, env=env, check=False)  # fmt: skip
    assert_user_error(out, "slide_encoder.pth", "--slide-encoder")
    assert not home.exists() or not any(home.iterdir())
    # check / remove name what is wrong with the name: built in, or not registered
    for verb in ("check", "remove"):
        out = run_cli("models", verb, "demo", cache=cache, env=env, check=False)
        assert_user_error(out, "'demo' is built in", f"nothing to {verb}")
        out = run_cli("models", verb, "nobody", cache=cache, env=env, check=False)
        assert_user_error(out, f"no user model named 'nobody' to {verb}", "registered: none")


def test_moved_parts_and_unready_models_fail_before_featurizing(parts, tmp_path, world):
    env = _env(tmp_path, parts)
    cache = tmp_path / "cache"
    moved = tmp_path / "gp-copy"
    shutil.copytree(parts["tile_encoder"], moved)
    run_cli(
        "models",
        "add",
        "e1",
        "--llava",
        str(parts["llava"]),
        "--tile-encoder",
        str(moved),
        cache=cache,
        env=env,
    )
    shutil.rmtree(moved)
    listed = json.loads(run_cli("models", "--json", cache=cache, env=env).stdout)
    entry = {m["name"]: m for m in listed["models"]}["e1"]
    assert entry["resolves"] is False and "gp-copy" in entry["problem"]
    slide = world / "slides" / "slide_000.tif"
    out = run_cli("ask", str(slide), Q, "--model", "e1", "--device", "cpu", cache=cache, env=env, check=False)
    assert_user_error(out, "e1", "gp-copy")
    out = run_cli("models", "check", "e1", cache=cache, env=env, check=False)
    assert_user_error(out, "gp-copy")
    # a LLaVA folder named directly has no slide encoder: refused before any tile is read
    out = run_cli("ask", str(slide), Q, "--model", str(parts["llava"]), "--device", "cpu", cache=cache, env=env,
                  check=False)  # fmt: skip
    assert_user_error(out, "has no slide encoder", "--features")
    out = run_cli("ask", str(slide), Q, "--model", "no-such-model", cache=cache, env=env, check=False)
    assert_user_error(out, "no-such-model", "models add")
    assert not (cache / "features").exists() or not any((cache / "features").iterdir())


def test_our_stage3_lora_over_a_llava_base(parts, tmp_path, world, shared_cache):
    """The paper recipe's stage 3 (LoRA + projector over a merged LLaVA folder, on .pt tokens) trained here,
    then registered over this machine's copy of the base and asked about a slide."""
    g = torch.Generator().manual_seed(0)
    (tmp_path / "features").mkdir()
    rows = []
    for i in range(4):
        torch.save(torch.randn(576, 1024, generator=g), tmp_path / "features" / f"s{i}.pt")
        rows.append({"question_id": f"Description_{i}_1", "image": f"s{i}.pt", "metadata": "description",
                     "question": "<image>\n" + Q, "T-answer": f"Answer number {i}."})  # fmt: skip
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "s3.yaml"
    cfg.write_text(
        f"data: {{bench: [{tmp_path / 'bench'}], features: {tmp_path / 'features'}, max_length: 1024}}\n"
        f"model: {{base: {parts['llava']}}}\nlora: {{r: 2, alpha: 4, dropout: 0.0}}\n"
        "optim: {lr: 5.0e-3, projector_lr: 1.0e-3, warmup_ratio: 0.0}\n"
        "train: {max_steps: 2, epochs: 1, batch_size: 2, bf16: false, group_by_length: false}\n"
    )
    env = _env(tmp_path, parts)
    cache = tmp_path / "cache"
    run_cli("train", "stage3", "--config", str(cfg), "--out", str(tmp_path / "runs"), "--device", "cpu",
            cache=cache, env=env)  # fmt: skip
    final = tmp_path / "runs" / "final"
    assert (final / "lora" / "adapter_config.json").is_file() and (final / "projector.safetensors").is_file()
    base_here = tmp_path / "llava-v1.5-7b"  # the base as this machine holds it, not where training saw it
    shutil.copytree(parts["llava"], base_here)

    out = run_cli("models", "add", "my-lora", "--llava", str(final), "--llava-base", str(base_here),
                  "--tile-encoder", str(parts["tile_encoder"]), cache=cache, env=env)  # fmt: skip
    assert "registered my-lora" in out.stdout and "LoRA" in out.stdout, out.stdout
    spec = json.loads((tmp_path / "home" / "models" / "my-lora" / "wsi_llava.json").read_text())
    assert spec["llm"] == {
        "source": str(final.resolve()),
        "format": "wsi-llava",
        "base": str(base_here.resolve()),
    }
    assert "every part is in place" in run_cli("models", "check", "my-lora", cache=cache, env=env).stdout

    slide = world / "slides" / "slide_000.tif"
    ans = json.loads(
        run_cli("ask", str(slide), Q, "--model", "my-lora", "--json", "--max-new-tokens", "4", "--device", "cpu",
                cache=cache, env=env).stdout
    )  # fmt: skip
    assert ans["model"] == "my-lora" and ans["demo"] is False and len(ans["evidence"]["scores"]) > 0

    # the LoRA and the trained projector are in the loaded model, not only the base's weights
    import os

    from safetensors.torch import load_file

    from wsi_llava.model import load_model
    from wsi_llava.model.llava_import import read_llava

    old = os.environ.get("WSI_LLAVA_HOME")
    os.environ["WSI_LLAVA_HOME"] = env["WSI_LLAVA_HOME"]
    try:
        model = load_model("my-lora", device="cpu", dtype="float32")
    finally:
        os.environ.pop("WSI_LLAVA_HOME") if old is None else os.environ.__setitem__("WSI_LLAVA_HOME", old)
    base = read_llava(base_here, None, device="cpu", dtype="float32")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(model.llm.state_dict()[q], base.llm.state_dict()[q])
    trained = load_file(str(final / "projector.safetensors"))
    assert all(torch.equal(v, model.projector.state_dict()[k].float()) for k, v in trained.items())
    run_cli("models", "remove", "my-lora", cache=cache, env=env)


def test_a_checkpoint_of_ours_keeps_its_own_slide_encoder(parts, tmp_path, monkeypatch):
    """A wsi-llava checkpoint with a (stage-1 tuned) slide encoder: registered over a tile encoder, its own
    slide encoder is used, not the ``slide_encoder.pth`` beside the tile encoder."""
    from wsi_llava import registry
    from wsi_llava.model import load_model
    from wsi_llava.model.checkpoint import save_checkpoint

    monkeypatch.setenv("WSI_LLAVA_HOME", str(tmp_path / "home"))
    registry.add_model("gp", llava=parts["llava"], tile_encoder=parts["tile_encoder"])
    model = load_model("gp", device="cpu", dtype="float32")
    with torch.no_grad():  # as if stage 1 had tuned it
        for p in model.slide_encoder.parameters():
            p.add_(0.01)
    model.spec.name = "tuned"
    save_checkpoint(model, tmp_path / "tuned")
    registry.add_model("tuned", llava=tmp_path / "tuned", tile_encoder=parts["tile_encoder"])
    stored = json.loads((tmp_path / "home" / "models" / "tuned" / "wsi_llava.json").read_text())
    assert stored["slide_encoder_weights"] == str(
        (tmp_path / "tuned" / "slide_encoder.safetensors").resolve()
    )
    assert stored["llm"]["format"] == "wsi-llava"
    again = load_model("tuned", device="cpu", dtype="float32")
    for (k, a), b in zip(model.slide_encoder.state_dict().items(), again.slide_encoder.state_dict().values(),
                         strict=True):  # fmt: skip
        assert torch.equal(a, b), k
    fresh = load_model("gp", device="cpu", dtype="float32")
    assert not torch.equal(next(fresh.slide_encoder.parameters()), next(again.slide_encoder.parameters()))
