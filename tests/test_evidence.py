"""Evidence: integrated gradients through slide encoder, projector and LLM, on a real slide and real model code."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi_llava.model import evidence
from wsi_llava.slide.region import Region
from wsi_llava.slide.tiling import select_tiles

Q = "Is there tumour on this slide?"


@pytest.fixture(scope="module")
def session(world, tiny_model):
    from wsi_llava.session import SlideSession

    with SlideSession(world / "slides" / "slide_000.tif", tiny_model) as s:
        s.extract()
        yield s


def _inputs(session):
    feats = session.extract()
    x = torch.from_numpy(np.asarray(feats.features, np.float32))
    c = torch.from_numpy(np.asarray(feats.coords, np.int64))
    return x, c, session.grid.tile_size_level0


def _log_prob(model, x, c, tile, answer):
    ids = torch.tensor([model.prompt(Q).input_ids + answer])
    with torch.no_grad():
        return float(evidence._answer_log_prob(model, ids, len(answer), x, c, tile))


def test_planted_tile_carries_the_whole_change(session):
    """Every tile but one is the reference tile: only that one can change the answer, and it gets all of it."""
    model = session.model
    x, c, tile = _inputs(session)
    ref = evidence.reference_features(model, x)
    k = len(x) // 2
    planted = ref.clone()
    planted[k] = x[k] * 4.0
    # the answer token that the planted tile makes much more likely than the reference slide does
    ids = torch.tensor([model.prompt(Q).input_ids])

    def first_logp(feats):
        with torch.no_grad():
            s = model.embed(ids, model.slide_encoder(feats, c, tile)[None])
            return (
                model.llm(inputs_embeds=s.inputs_embeds, use_cache=False)
                .logits[0, -1]
                .float()
                .log_softmax(-1)
            )

    first = int((first_logp(planted) - first_logp(ref)).argmax())
    answer = [first]
    attr = evidence.tile_attributions(model, Q, planted, c, tile, answer, steps=64, reference=ref)
    others = np.delete(attr, k)
    assert np.all(others == 0.0) and attr[k] != 0.0
    # completeness: the attributions add up to the change in log-probability from the reference slide
    change = _log_prob(model, planted, c, tile, answer) - _log_prob(model, ref, c, tile, answer)
    assert attr.sum() == pytest.approx(change, rel=0.02, abs=1e-4)
    assert change > 0
    rel = np.clip(attr, 0, None) / attr.clip(min=0).sum()  # what tile_relevance returns from these
    assert int(np.argmax(rel)) == k and rel[k] == pytest.approx(1.0)


def test_attributions_differ_from_a_one_step_gradient(session):
    """More steps integrate along the path: a real change, not the same number scaled."""
    model = session.model
    x, c, tile = _inputs(session)
    one = evidence.tile_attributions(model, Q, x, c, tile, [5, 6], steps=1)
    many = evidence.tile_attributions(model, Q, x, c, tile, [5, 6], steps=6)
    assert one.shape == many.shape == (len(x),)
    assert not np.allclose(one, many)


def test_answers_carry_deterministic_tile_evidence(session):
    a = session.ask(Q, max_new_tokens=4)
    b = session.ask(Q, max_new_tokens=4)
    ev = a.evidence
    assert ev.method == evidence.METHOD
    assert len(ev.scores) == len(ev.tile_indices) == len(session.grid.coords)
    assert sum(ev.scores) == pytest.approx(1.0, abs=1e-4) and min(ev.scores) >= 0
    assert a.answer == b.answer and ev.scores == b.evidence.scores


def test_region_evidence_stays_inside_the_region(session):
    w, h = session.reader.dimensions
    region = Region.rectangle(0, 0, w // 2, h // 2, name="top left")
    inside = set(int(i) for i in select_tiles(session.grid, region))
    a = session.ask("Is there tumour in this region?", region, max_new_tokens=4)
    assert set(a.evidence.tile_indices) == inside and len(inside) < len(session.grid.coords)
    assert sum(a.evidence.scores) == pytest.approx(1.0, abs=1e-4)
    for x, y in a.evidence.coords:  # every listed tile's centre lies in the region
        t = session.grid.tile_size_level0
        assert region.contains(np.array([x + t / 2]), np.array([y + t / 2]))[0]


def test_evidence_needs_a_slide_encoder_and_steps(session):
    from wsi_llava.errors import ModelError

    model = session.model
    x, c, tile = _inputs(session)
    with pytest.raises(ValueError, match="steps"):
        evidence.tile_attributions(model, Q, x, c, tile, [5], steps=0)
    encoder, model.slide_encoder = model.slide_encoder, None
    try:
        with pytest.raises(ModelError, match="no slide encoder"):
            evidence.tile_relevance(model, Q, x, c, tile, [5])
    finally:
        model.slide_encoder = encoder
    assert evidence.tile_attributions(model, Q, x, c, tile, []).tolist() == [0.0] * len(x)


def test_recomputed_layers_give_the_same_attributions(session, monkeypatch):
    """The CUDA memory path (LongNet and LLM layers recomputed in the backward) changes no number."""
    model = session.model
    x, c, tile = _inputs(session)
    plain = evidence.tile_attributions(model, Q, x, c, tile, [5, 6], steps=2)
    original = evidence._recompute
    monkeypatch.setattr(evidence, "_recompute", lambda m, enable: original(m, True))
    again = evidence.tile_attributions(model, Q, x, c, tile, [5, 6], steps=2)
    assert np.allclose(plain, again, rtol=1e-5, atol=1e-9)
    layers = evidence._decoder_layers(model.llm)
    assert layers and all("forward" not in vars(layer) for layer in layers)
    hooked = layers[0].forward  # an instance forward set by someone else (e.g. accelerate) survives
    layers[0].forward = hooked
    try:
        evidence.tile_attributions(model, Q, x, c, tile, [5, 6], steps=1)
        assert vars(layers[0])["forward"] is hooked
    finally:
        del layers[0].forward
    assert not model.slide_encoder.longnet.encoder.grad_checkpointing


def test_path_points_batched_into_one_pass_give_the_same_attributions(session, monkeypatch):
    """CPU runs every path point in one batched pass, CUDA one per pass: the same integral either way."""
    monkeypatch.setattr(evidence, "EAGER_ATTENTION_BYTES", 0)  # the LLM's own attention, batch-invariant
    model = session.model
    x, c, tile = _inputs(session)
    one = evidence.tile_attributions(model, Q, x, c, tile, [5, 6], steps=4, points_per_pass=1)
    for per_pass in (3, 4, None):  # uneven chunks, all points at once, the CPU default (all)
        got = evidence.tile_attributions(model, Q, x, c, tile, [5, 6], steps=4, points_per_pass=per_pass)
        assert np.allclose(got, one, rtol=1e-5, atol=1e-9)
    assert np.abs(one).sum() > 0


def test_cpu_pass_runs_matmul_attention_where_it_fits_and_gives_the_same_attributions(session, monkeypatch):
    """On CPU the gradient pass switches the LLM to eager attention while what that keeps for the backward
    fits the budget (its backward is faster there than the flash kernel's), with the same attributions as
    the LLM's own attention; the LLM's own comes back afterwards, after a failure too."""
    model = session.model
    x, c, tile = _inputs(session)
    own = model.llm.config._attn_implementation
    assert own != "eager"
    seen: list[str] = []
    log_prob = evidence._answer_log_prob

    def spy(*args, **kw):
        seen.append(model.llm.config._attn_implementation)
        return log_prob(*args, **kw)

    monkeypatch.setattr(evidence, "_answer_log_prob", spy)
    fast = evidence.tile_attributions(model, Q, x, c, tile, [5, 6], steps=4)
    assert seen == ["eager"] and model.llm.config._attn_implementation == own
    monkeypatch.setattr(evidence, "EAGER_ATTENTION_BYTES", 1024)  # a slide too long for the budget
    plain = evidence.tile_attributions(model, Q, x, c, tile, [5, 6], steps=4)
    assert seen == ["eager", own]
    assert np.abs(plain).sum() > 0 and np.allclose(fast, plain, rtol=1e-3, atol=1e-8)

    monkeypatch.setattr(evidence, "EAGER_ATTENTION_BYTES", 1 << 30)

    def fail(*args, **kw):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(evidence, "_answer_log_prob", fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        evidence.tile_attributions(model, Q, x, c, tile, [5, 6], steps=4)
    assert model.llm.config._attn_implementation == own
