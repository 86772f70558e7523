"""Fast decoding (static KV buffers + the hand-written decode step) against the eager Hugging Face loop.

CPU only: the CUDA-graph capture itself runs on the GPU benchmark (benchmarks/bench_decode.py); here
the same step runs without a graph, and the fallbacks are forced.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from kits.llm import make_tiny_wsi_llava

from wsi_llava.errors import ModelError
from wsi_llava.model import fast_decode
from wsi_llava.model.fast_decode import FastDecoder, UnsupportedModel, resolve_mode
from wsi_llava.progress import CancelToken

Q = "What is shown in this slide?"


@pytest.fixture(scope="module")
def model(tiny_llm_dir):
    return make_tiny_wsi_llava(tiny_llm_dir)


@pytest.fixture
def vis():
    return torch.randn(8, 32, generator=torch.Generator().manual_seed(3))


def _run(model, vis, mode, **kw):
    model.fast_decode = mode
    try:
        text = model.generate_text(Q, vis, **kw)
    finally:
        model.fast_decode = None
    gen = model.last_generation
    return text, gen.new_token_ids, gen.decode_path


def test_resolve_mode(monkeypatch):
    monkeypatch.delenv(fast_decode.ENV_VAR, raising=False)
    assert resolve_mode(None, "cpu") == "off"
    assert resolve_mode(None, "cuda") == fast_decode.DEFAULT_CUDA_MODE
    assert resolve_mode(True, "cpu") == "static" and resolve_mode(False, "cuda") == "off"
    assert resolve_mode("compile", "cpu") == "static" and resolve_mode("compile", "cuda") == "compile"
    monkeypatch.setenv(fast_decode.ENV_VAR, "0")
    assert resolve_mode(None, "cuda") == "off"
    assert resolve_mode(True, "cuda") == fast_decode.DEFAULT_CUDA_MODE  # an explicit argument wins
    monkeypatch.setenv(fast_decode.ENV_VAR, "1")
    assert resolve_mode(None, "cpu") == "static"
    monkeypatch.setenv(fast_decode.ENV_VAR, "maybe")
    with pytest.raises(ModelError, match="WSI_LLAVA_FAST_DECODE='maybe'"):
        resolve_mode(None, "cuda")


def test_static_step_gives_the_eager_greedy_ids(model, vis):
    assert model.llm.config.num_key_value_heads < model.llm.config.num_attention_heads  # GQA path
    eager = _run(model, vis, False, max_new_tokens=40, temperature=0.0)
    fast = _run(model, vis, True, max_new_tokens=40, temperature=0.0)
    assert eager[2] == "eager" and fast[2] == "static"
    assert len(eager[1]) > 5
    assert fast[:2] == eager[:2]


def test_step_logits_match_the_hf_forward(model, vis):
    """Teacher-forced: the same tokens through the static step and through the HF model with its cache."""
    llm = model.llm
    s = model.embed(torch.tensor([model.prompt(Q).input_ids]), vis[None])
    n = s.inputs_embeds.shape[1]
    tokens = torch.randint(0, llm.config.vocab_size, (12,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        out = llm(inputs_embeds=s.inputs_embeds, position_ids=s.position_ids, use_cache=True)
        dec = FastDecoder(llm, "static")
        dec.ensure_capacity(n + len(tokens))
        dec.load_prefix(out.past_key_values, n)
        ref = llm(
            inputs_embeds=torch.cat([s.inputs_embeds, llm.get_input_embeddings()(tokens[None])], dim=1)
        ).logits[0, n:]
        got = torch.stack([dec.step(int(t), n + i)[0].clone() for i, t in enumerate(tokens)])
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_sampling_ngram_and_cancel_on_the_fast_path(model, vis):
    kw = {"max_new_tokens": 25, "temperature": 1.0, "top_p": 0.9, "seed": 11}
    assert _run(model, vis, True, **kw)[:2] == _run(model, vis, False, **kw)[:2]
    kw = {"max_new_tokens": 30, "no_repeat_ngram_size": 2}
    fast = _run(model, vis, True, **kw)
    assert fast[:2] == _run(model, vis, False, **kw)[:2] and fast[2] == "static"
    bigrams = list(zip(fast[1], fast[1][1:], strict=False))
    assert len(bigrams) == len(set(bigrams))
    model.fast_decode = True
    try:
        token, got = CancelToken(), []
        for chunk in model.stream(Q, vis, max_new_tokens=40, cancel=token):
            got.append(chunk)
            token.cancel()
        assert model.last_generation.stop_reason == "cancelled" and len(got) == 1
        # the lock was released: the next stream uses the fast path again
        list(model.stream(Q, vis, max_new_tokens=5))
        assert model.last_generation.decode_path == "static"
    finally:
        model.fast_decode = None


def test_a_copy_leaves_the_decoder_behind(model, vis):
    model.fast_decode = True
    try:
        list(model.stream(Q, vis, max_new_tokens=4))
        assert model._fast is not None
        twin = copy.deepcopy(model)
        assert twin._fast is None and model._fast is not None
        assert twin.generate_text(Q, vis, max_new_tokens=6) == model.generate_text(Q, vis, max_new_tokens=6)
        assert twin.last_generation.decode_path == "static"
    finally:
        model.fast_decode = None


def test_env_var_turns_it_on_and_off(model, vis, monkeypatch):
    monkeypatch.setenv(fast_decode.ENV_VAR, "1")
    list(model.stream(Q, vis, max_new_tokens=4))
    assert model.last_generation.decode_path == "static"
    monkeypatch.setenv(fast_decode.ENV_VAR, "0")
    list(model.stream(Q, vis, max_new_tokens=4))
    assert model.last_generation.decode_path == "eager"


def test_buffers_grow_between_answers(model, vis, monkeypatch):
    monkeypatch.setattr(fast_decode, "CAPACITY_STEP", 16)
    model._fast = None  # a fresh decoder, sized by the small step
    eager_short, eager_long = (
        _run(model, vis, False, max_new_tokens=6),
        _run(model, vis, False, max_new_tokens=30),
    )
    assert _run(model, vis, True, max_new_tokens=6)[:2] == eager_short[:2]
    cap = model._fast[1].capacity
    assert _run(model, vis, True, max_new_tokens=30)[:2] == eager_long[:2]
    assert model._fast[1].capacity > cap and model._fast[1].capacity % 16 == 0
    model.release_fast_decoder()
    assert model._fast is None


def test_peft_model_falls_back_to_eager(tiny_llm_dir, vis, caplog):
    from peft import LoraConfig, get_peft_model

    m = make_tiny_wsi_llava(tiny_llm_dir)
    m.llm = get_peft_model(
        m.llm, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    m.llm.eval()
    with pytest.raises(UnsupportedModel, match="peft"):
        FastDecoder(m.llm, "static")
    with caplog.at_level(logging.WARNING, logger="wsi_llava.model.wsi_llava"):
        fast = _run(m, vis, True, max_new_tokens=10)
    assert fast[2] == "eager" and "peft" in caplog.text
    assert fast[:2] == _run(m, vis, False, max_new_tokens=10)[:2]


def test_step_failure_falls_back_to_eager(model, vis, monkeypatch, caplog):
    eager = _run(model, vis, False, max_new_tokens=15)

    def broken(self, token, position):
        raise RuntimeError("simulated capture failure")

    monkeypatch.setattr(FastDecoder, "step", broken)
    with caplog.at_level(logging.WARNING, logger="wsi_llava.model.wsi_llava"):
        fast = _run(model, vis, True, max_new_tokens=15)
    assert fast == eager and "simulated capture failure" in caplog.text


def test_graph_mode_drops_to_static_when_capture_fails(model, vis, monkeypatch, caplog):
    """A graph/compile decoder whose capture raises keeps decoding, one mode simpler each time."""
    dec = FastDecoder(model.llm, "graph")
    assert dec.mode == "static"  # no CUDA here: graph modes need it
    dec.mode = "compile"  # pretend, to exercise the fallback chain
    calls = []

    def failing_capture():
        calls.append(dec.mode)
        raise RuntimeError(f"cannot capture in {dec.mode}")

    monkeypatch.setattr(dec, "_capture", failing_capture)
    s = model.embed(torch.tensor([model.prompt(Q).input_ids]), vis[None])
    n = s.inputs_embeds.shape[1]
    with torch.inference_mode(), caplog.at_level(logging.WARNING, logger="wsi_llava.model.fast_decode"):
        out = model.llm(inputs_embeds=s.inputs_embeds, position_ids=s.position_ids, use_cache=True)
        dec.load_prefix(out.past_key_values, n)
        logits = dec.step(5, n).clone()
        ref = model.llm(
            inputs_embeds=torch.cat(
                [s.inputs_embeds, model.llm.get_input_embeddings()(torch.tensor([[5]]))], 1
            )
        ).logits[0, -1:]
    assert calls == ["compile", "graph"] and dec.mode == "static"
    assert "compile mode failed" in caplog.text and "graph mode failed" in caplog.text
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)


def test_warm_up_in_a_thread_builds_the_decoder_the_answer_uses(model, vis):
    """``warm_fast_decode`` builds the decoder in a thread; the next answer reuses it, same ids as eager."""
    eager = _run(model, vis, False, max_new_tokens=20)
    model.release_fast_decoder()
    model.fast_decode = "static"
    try:
        assert model.warm_fast_decode(length=200)
        model.wait_fast_decode()
        dec = model._fast[1]
        assert dec is not None and dec.capacity >= 200
        assert not model.warm_fast_decode(length=200)  # already built: no second warm-up
        text = model.generate_text(Q, vis, max_new_tokens=20)
        assert model._fast[1] is dec  # reused, not rebuilt
        assert (text, model.last_generation.new_token_ids) == eager[:2]
        assert model.last_generation.decode_path == "static"
    finally:
        model.fast_decode = None
    assert not model.warm_fast_decode()  # off on CPU by default: nothing to warm


def test_an_answer_waits_for_a_warm_up_in_flight(model, vis, monkeypatch):
    import threading

    eager = _run(model, vis, False, max_new_tokens=12)
    model.release_fast_decoder()
    gate, prepared = threading.Event(), []
    real = FastDecoder.prepare

    def slow_prepare(self):
        gate.wait(10)
        prepared.append(self)
        real(self)

    monkeypatch.setattr(FastDecoder, "prepare", slow_prepare)
    model.fast_decode = "static"
    try:
        assert model.warm_fast_decode()
        threading.Timer(0.3, gate.set).start()
        fast = _run(model, vis, "static", max_new_tokens=12)
    finally:
        model.fast_decode = None
    assert prepared and model._fast[1] is prepared[0]  # the answer used the warmed decoder
    assert fast == (eager[0], eager[1], "static")
