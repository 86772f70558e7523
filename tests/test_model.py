"""WSILlava on a tiny random Llama: the splice, loss masking, streaming, cancel, evidence, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from kits.llm import make_tiny_wsi_llava

from wsi_llava.errors import ModelError, WsiLlavaError
from wsi_llava.model import load_model
from wsi_llava.model.checkpoint import load_checkpoint, save_checkpoint
from wsi_llava.model.llm import load_llm
from wsi_llava.model.spec import ModelSpec
from wsi_llava.model.templates import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from wsi_llava.progress import CancelToken

Q = "What is shown in this slide?"


@pytest.fixture(scope="module")
def model(tiny_llm_dir):
    return make_tiny_wsi_llava(tiny_llm_dir)


@pytest.fixture
def vis():
    return torch.randn(8, 32, generator=torch.Generator().manual_seed(3))


def test_splice_positions(model, vis):
    parts = model.prompt(Q)
    ids = torch.tensor([parts.input_ids])
    s = model.embed(ids, vis[None])
    p = parts.image_position
    n = vis.shape[0]
    emb = model.llm.get_input_embeddings().weight
    assert s.inputs_embeds.shape == (1, len(parts.input_ids) - 1 + n, model.llm.config.hidden_size)
    assert int(s.image_starts[0]) == p and s.n_visual == n
    torch.testing.assert_close(s.inputs_embeds[0, :p], emb[ids[0, :p]])
    torch.testing.assert_close(s.inputs_embeds[0, p : p + n], model.projector(vis))
    torch.testing.assert_close(s.inputs_embeds[0, p + n :], emb[ids[0, p + 1 :]])
    assert s.attention_mask.shape == s.inputs_embeds.shape[:2] and bool(s.attention_mask.all())
    assert s.position_ids[0].tolist() == list(range(s.inputs_embeds.shape[1]))


def test_splice_errors(model, vis):
    ids = torch.tensor([model.prompt(Q).input_ids])
    with pytest.raises(ValueError, match="exactly one"):
        model.embed(ids.clamp(min=0), vis[None])
    two = torch.cat([ids, torch.tensor([[IMAGE_TOKEN_INDEX]])], dim=1)
    with pytest.raises(ValueError, match="exactly one"):
        model.embed(two, vis[None])
    with pytest.raises(ValueError, match="no visual tokens"):
        model.embed(ids, None)
    with pytest.raises(ValueError, match="visual tokens for 2"):
        model.embed(ids, torch.stack([vis, vis]))


def test_forward_loss_on_answer_only_with_right_padding(model, vis):
    a = model.prompt(Q, "The slide shows tumour cells.")
    b = model.prompt("Is there necrosis?", "Yes.")
    L = max(len(a.input_ids), len(b.input_ids))
    pad = model.tokenizer.pad_token_id

    def padded(x, fill):
        return x + [fill] * (L - len(x))

    ids = torch.tensor([padded(a.input_ids, pad), padded(b.input_ids, pad)])
    labels = torch.tensor([padded(a.labels, IGNORE_INDEX), padded(b.labels, IGNORE_INDEX)])
    mask = torch.tensor([padded([1] * len(a.input_ids), 0), padded([1] * len(b.input_ids), 0)])
    vis2 = torch.stack([vis, vis.flip(0)])
    with torch.no_grad():
        out = model(ids, vis2, labels=labels, attention_mask=mask)
        s = model.embed(ids, vis2, attention_mask=mask, labels=labels)
        # visual positions are masked from the loss
        p = int(s.image_starts[0])
        assert (s.labels[:, p : p + 8] == IGNORE_INDEX).all()
        # manual loss: shift, mean over answer tokens of both rows
        logits = out.logits.float()
        lab = s.labels[:, 1:]
        manual = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), lab.reshape(-1), ignore_index=IGNORE_INDEX
        )
        torch.testing.assert_close(out.loss, manual, rtol=1e-5, atol=1e-5)
        # each padded row gives the same logits as the row alone (right padding is harmless)
        for row, parts, v in ((0, a, vis), (1, b, vis.flip(0))):
            alone = model(torch.tensor([parts.input_ids]), v[None]).logits[0]
            n = alone.shape[0]
            torch.testing.assert_close(out.logits[row, :n], alone, rtol=1e-4, atol=1e-4)
    n_answer = sum(1 for x in a.labels if x != IGNORE_INDEX) + sum(1 for x in b.labels if x != IGNORE_INDEX)
    assert int((s.labels != IGNORE_INDEX).sum()) == n_answer


def _greedy_no_cache(model, vis, n):
    """Reference: recompute the whole sequence every step, no KV cache."""
    parts = model.prompt(Q)
    s = model.embed(torch.tensor([parts.input_ids]), vis[None])
    embeds = s.inputs_embeds
    out_ids = []
    emb = model.llm.get_input_embeddings()
    stop = {model.tokenizer.eos_token_id}
    with torch.no_grad():
        for _ in range(n):
            tok = int(model.llm(inputs_embeds=embeds).logits[0, -1].argmax())
            if tok in stop:
                break
            out_ids.append(tok)
            embeds = torch.cat([embeds, emb(torch.tensor([[tok]]))], dim=1)
    return out_ids


def test_stream_matches_reference_and_generate(model, vis):
    chunks = list(model.stream(Q, vis, max_new_tokens=12, temperature=0.0))
    gen = model.last_generation
    assert gen.n_new_tokens == len(gen.new_token_ids) > 0
    assert "".join(chunks) == gen.text
    assert gen.text == model.tokenizer.decode(gen.new_token_ids, skip_special_tokens=True).lstrip()
    assert gen.new_token_ids == _greedy_no_cache(model, vis, 12)
    assert gen.prompt_len == len(model.prompt(Q).input_ids) - 1 + 8 and gen.n_visual_tokens == 8
    assert gen.prefill_seconds > 0 and gen.decode_seconds > 0
    s = model.embed(torch.tensor([model.prompt(Q).input_ids]), vis[None])
    with torch.no_grad():
        ref = model.llm.generate(
            inputs_embeds=s.inputs_embeds, attention_mask=s.attention_mask, max_new_tokens=12, do_sample=False
        )[0].tolist()
    ref = [t for t in ref if t != model.tokenizer.eos_token_id]
    assert gen.new_token_ids == ref


def test_no_repeat_ngram_matches_generate(model, vis):
    text = model.generate_text(Q, vis, max_new_tokens=30, no_repeat_ngram_size=2)
    ids = model.last_generation.new_token_ids
    bigrams = list(zip(ids, ids[1:], strict=False))
    assert len(bigrams) == len(set(bigrams))
    s = model.embed(torch.tensor([model.prompt(Q).input_ids]), vis[None])
    with torch.no_grad():
        ref = model.llm.generate(
            inputs_embeds=s.inputs_embeds,
            attention_mask=s.attention_mask,
            max_new_tokens=30,
            do_sample=False,
            no_repeat_ngram_size=2,
        )[0].tolist()
    assert ids == [t for t in ref if t != model.tokenizer.eos_token_id]
    assert isinstance(text, str)


def test_sampling_is_seeded(model, vis):
    a = model.generate_text(Q, vis, max_new_tokens=15, temperature=1.0, top_p=0.9, seed=7)
    ids_a = model.last_generation.new_token_ids
    b = model.generate_text(Q, vis, max_new_tokens=15, temperature=1.0, top_p=0.9, seed=7)
    assert (a, ids_a) == (b, model.last_generation.new_token_ids)
    greedy = model.generate_text(Q, vis, max_new_tokens=15)
    others = {tuple(ids_a)}
    for seed in range(8):
        model.generate_text(Q, vis, max_new_tokens=15, temperature=1.5, seed=seed)
        others.add(tuple(model.last_generation.new_token_ids))
    assert len(others) > 1, "different seeds at temperature 1.5 should not all give one sequence"
    assert isinstance(greedy, str)


def test_cancel_stops(model, vis):
    token = CancelToken()
    got = []
    for chunk in model.stream(Q, vis, max_new_tokens=40, cancel=token):
        got.append(chunk)
        token.cancel()
    gen = model.last_generation
    assert gen.stop_reason == "cancelled"
    assert len(got) == 1 and gen.n_new_tokens < 40
    # a plain callable works too
    list(model.stream(Q, vis, max_new_tokens=40, cancel=lambda: True))
    assert model.last_generation.n_new_tokens == 0 and model.last_generation.stop_reason == "cancelled"


def test_stream_bad_input(model, vis):
    with pytest.raises(WsiLlavaError, match="question is empty"):
        list(model.stream("  ", vis))
    with pytest.raises(ModelError, match="expected \\(n_tokens, 32\\)"):
        list(model.stream(Q, torch.randn(8, 31)))
    with pytest.raises(ModelError, match="temperature"):
        list(model.stream(Q, vis, temperature=-1))
    with pytest.raises(ModelError, match="top_p"):
        list(model.stream(Q, vis, temperature=1, top_p=1.5))
    with pytest.raises(ModelError, match="max_new_tokens"):
        list(model.stream(Q, vis, max_new_tokens=0))


def test_checkpoint_round_trip(model, vis, tmp_path):
    folder = save_checkpoint(model, tmp_path / "ckpt")
    assert {p.name for p in folder.iterdir()} == {"wsi_llava.json", "projector.safetensors"}
    spec = json.loads((folder / "wsi_llava.json").read_text())
    assert spec["llm"]["source"] == model.spec.llm.source and spec["projector"]["in_dim"] == 32
    loaded = load_model(folder)
    ids = torch.tensor([model.prompt(Q).input_ids])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(ids, vis[None]).logits, model(ids, vis[None]).logits, rtol=0, atol=0
        )
    # self-contained copy of the LLM
    folder2 = save_checkpoint(loaded, tmp_path / "with_llm", save_llm=True)
    assert ModelSpec.load(folder2).llm.source == "llm"
    again = load_checkpoint(folder2)
    with torch.no_grad():
        torch.testing.assert_close(again(ids, vis[None]).logits, model(ids, vis[None]).logits)


def test_checkpoint_with_lora_round_trip(tiny_llm_dir, vis, tmp_path):
    from peft import LoraConfig, get_peft_model

    m = make_tiny_wsi_llava(tiny_llm_dir)
    m.llm = get_peft_model(m.llm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # make the adapter non-zero so that it matters
        for name, p in m.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    m.eval()
    ids = torch.tensor([m.prompt(Q).input_ids])
    with torch.no_grad():
        want = m(ids, vis[None]).logits
    folder = save_checkpoint(m, tmp_path / "lora_ckpt")
    assert (folder / "lora" / "adapter_config.json").is_file() and ModelSpec.load(folder).lora == "lora"
    loaded = load_checkpoint(folder)
    with torch.no_grad():
        got = loaded(ids, vis[None]).logits
        base = make_tiny_wsi_llava(tiny_llm_dir)(ids, vis[None]).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(base, want, atol=1e-3)


def test_model_errors(tmp_path):
    with pytest.raises(ModelError, match="not a wsi-llava or LLaVA checkpoint"):
        load_model(tmp_path)
    with pytest.raises(ModelError, match="demo"):
        load_model("no-such-model")
    with pytest.raises(ModelError, match="no such folder"):
        load_llm(tmp_path / "missing")
    with pytest.raises(ModelError, match="no config.json"):
        load_llm(tmp_path)
    (tmp_path / "wsi_llava.json").write_text(
        '{"name": "x", "llm": {"source": "y"}, "projector": {"type": "conv"}}'
    )
    with pytest.raises(ModelError, match="projector.type"):
        load_model(tmp_path)
    (tmp_path / "wsi_llava.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_model(tmp_path)


def test_missing_projector_file(model, tmp_path):
    folder = save_checkpoint(model, tmp_path / "ckpt")
    (folder / "projector.safetensors").unlink()
    with pytest.raises(ModelError, match="projector.safetensors: missing"):
        load_checkpoint(folder)


def test_plugin_registers_demo_without_torch_import():
    import subprocess
    import sys

    code = (
        "import sys; from wsi_llava import plugins; import wsi_llava.model; "
        "m = plugins.models(); assert 'demo' in m, m; "
        "assert not any(k in sys.modules for k in ('torch', 'transformers')), 'heavy import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={"WSI_LLAVA_LOAD_PLUGINS": "0", **_env()})


def _env():
    import os

    return dict(os.environ)


def test_prompt_longer_than_the_context_is_refused_before_the_llm_runs(model, vis):
    """The tiny Llama has 512 positions: text + visual tokens + an explicit answer length must fit."""
    calls = []
    hook = model.llm.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        long_q = "Describe the tissue in detail. " * 200  # thousands of tokens
        with pytest.raises(
            ModelError,
            match=r"question too long for model 'tiny': \d+ text tokens \+ 8 visual tokens \+ 4 answer "
            r"tokens \(max_new_tokens\) exceed its context of 512 tokens \(max_position_embeddings\); "
            r"shorten the question$",
        ):
            model.generate_text(long_q, vis, max_new_tokens=4)
        n_text = len(model.prompt(Q).input_ids) - 1
        fits = 512 - n_text - 8
        with pytest.raises(
            ModelError,
            match=rf"\+ {fits + 1} answer tokens \(max_new_tokens\) exceed its "
            "context of 512 tokens.*lower max_new_tokens",
        ):
            model.generate_text(Q, vis, max_new_tokens=fits + 1)
        assert calls == []
    finally:
        hook.remove()
    _, gen = model.check_request(Q, n_visual=8)  # the default answer length (512) shrinks to what fits
    assert gen.max_new_tokens == fits
    _, gen = model.check_request(Q, n_visual=8, max_new_tokens=fits)
    assert gen.max_new_tokens == fits


@pytest.mark.parametrize(
    ("setting", "value", "match"),
    [
        ("temperature", float("inf"), r"temperature must be a finite number >= 0 \(0 = greedy\), got inf"),
        ("temperature", float("nan"), r"temperature must be a finite number >= 0"),
        ("temperature", -0.5, r"temperature must be a finite number >= 0"),
        ("top_p", 0.0, r"top_p must be a number in \(0, 1\], got 0.0"),
        ("top_p", 1.5, r"top_p must be a number in \(0, 1\]"),
        ("top_p", float("nan"), r"top_p must be a number in \(0, 1\]"),
        ("max_new_tokens", 0, r"max_new_tokens must be a whole number >= 1, got 0"),
        ("max_new_tokens", -3, r"max_new_tokens must be a whole number >= 1"),
    ],
)
def test_decoding_settings_out_of_range_are_refused(model, vis, setting, value, match):
    with pytest.raises(ModelError, match=match):
        model.generate_text(Q, vis, **{setting: value})


def test_wsi_llava_json_that_is_not_utf8_names_the_file(tmp_path):
    (tmp_path / "wsi_llava.json").write_bytes(b'{"name": "caf\xe9", "llm": {"source": "x"}}')
    with pytest.raises(ModelError, match=r"wsi_llava\.json: not UTF-8 text \(byte 0xe9 at offset 13\)"):
        load_model(tmp_path)


@pytest.fixture
def lora_checkpoint(tiny_llm_dir, tmp_path):  # noqa: F811
    from peft import LoraConfig, get_peft_model

    from wsi_llava.model.checkpoint import peft_quietly

    m = make_tiny_wsi_llava(tiny_llm_dir)
    with peft_quietly():
        m.llm = get_peft_model(m.llm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    return save_checkpoint(m, tmp_path / "ckpt")


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_projector_or_lora_names_the_file(lora_checkpoint):
    projector = lora_checkpoint / "projector.safetensors"
    saved = projector.read_bytes()
    _truncate(projector)
    with pytest.raises(
        ModelError,
        match=r"projector\.safetensors: cannot read the projector weights, the file is "
        r"truncated or corrupt \(SafetensorError",
    ):
        load_checkpoint(lora_checkpoint)
    projector.write_bytes(saved)
    _truncate(lora_checkpoint / "lora" / "adapter_model.safetensors")
    with pytest.raises(
        ModelError, match=r"ckpt/lora: cannot load the LoRA adapter, a file is truncated, corrupt"
    ):
        load_checkpoint(lora_checkpoint)


def test_loading_a_lora_checkpoint_emits_no_future_warning(lora_checkpoint):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        load_checkpoint(lora_checkpoint)
