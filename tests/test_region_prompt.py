"""A model's region cue (``ModelSpec.region_prompt``) reaches the LLM the same way from every path: a session's
answer and evidence, the server's batched answer, the length check, and the training prompts; whole-slide
questions are asked unchanged."""

from __future__ import annotations

import json
import shutil

import pytest

from wsi_llava.errors import ModelError
from wsi_llava.model.spec import SPEC_FILE, ModelSpec

CUE = "Answer about the selected region only. {question}"
Q = "What is the most likely diagnosis?"
TOKENS = 4


@pytest.fixture(scope="module")
def cued():
    """The demo model, asked with a region cue; ``prompts`` records every question its prompts were built for."""
    from wsi_llava.model import load_model

    model = load_model("demo", device="cpu")
    model.spec.region_prompt = CUE
    model.prompts = []
    built = model.prompt

    def spy(question, answer=None):
        model.prompts.append(question)
        return built(question, answer)

    model.prompt = spy
    return model


def region_of(slide):
    from wsi_llava.slide.region import Region

    return Region.rectangle(200, 300, 1200, 900, source="rectangle")


def test_spec_cue_default_and_validation(tmp_path):
    spec = ModelSpec(name="m", llm={"source": "x"})
    assert spec.model_question(Q, "region") == Q == spec.model_question(Q)
    spec = ModelSpec(name="m", llm={"source": "x"}, region_prompt=CUE)
    assert spec.model_question(Q, "region") == "Answer about the selected region only. " + Q
    assert spec.model_question(Q, "slide") == Q
    # a question that holds the slot text itself is not expanded twice
    assert spec.model_question("{question}?", "region").endswith(" {question}?")
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / SPEC_FILE).write_text(
        json.dumps({"name": "m", "llm": {"source": "x"}, "region_prompt": "In it:"})
    )
    with pytest.raises(ModelError, match=r"region_prompt: .*\{question\} exactly once"):
        ModelSpec.load(folder)


def test_session_answer_and_evidence_carry_the_cue(cued, world):
    from wsi_llava.session import SlideSession

    slide = sorted((world / "slides").glob("*.tif"))[0]
    with SlideSession(slide, cued, device="cpu") as s:
        cued.prompts.clear()
        whole = s.ask(Q, max_new_tokens=TOKENS)
        assert set(cued.prompts) == {Q}  # check, prompt, evidence: the question unchanged
        cued.prompts.clear()
        answer = s.ask(Q, region_of(slide), max_new_tokens=TOKENS)
        want = CUE.replace("{question}", Q)
        assert set(cued.prompts) == {want} and len(cued.prompts) >= 3  # length check, answer, evidence
        assert answer.question == Q and answer.scope == "region" and answer.evidence.scores
        indices = s.tiles_for(region_of(slide))
        assert (
            answer.answer == cued.generate_text(want, s.visual_tokens(indices), max_new_tokens=TOKENS).strip()
        )
    assert whole.scope == "slide"


def test_server_engine_asks_with_the_same_cue(cued, world, tmp_path):
    from wsi_llava.serve.config import ServeConfig
    from wsi_llava.serve.engine import Engine, Ticket
    from wsi_llava.serve.schemas import AskRequest
    from wsi_llava.session import SlideSession

    root = tmp_path / "slides"
    root.mkdir()
    slide = sorted((world / "slides").glob("*.tif"))[0]
    shutil.copy(slide, root / slide.name)
    engine = Engine(
        ServeConfig(models=["demo"], slides_root=root, cache=tmp_path / "cache", device="cpu"),
        loader=lambda name, device: cued,
    )
    engine.load()
    rect = {"x": 200, "y": 300, "width": 1200, "height": 900}
    req = AskRequest(slide=slide.name, question=Q, rectangle=rect, max_new_tokens=TOKENS, evidence=False)
    cued.prompts.clear()
    got = engine.ask(req, Ticket(), None)
    assert CUE.replace("{question}", Q) in cued.prompts and Q not in cued.prompts
    with SlideSession(root / slide.name, cued, device="cpu", cache_dir=tmp_path / "cache") as s:
        want = s.ask(Q, region_of(slide), max_new_tokens=TOKENS, evidence=False)
    assert got.answer == want.answer and got.scope == "region"


def test_training_prompts_cue_region_samples_only(cued):
    from wsi_llava.train.data import Sample
    from wsi_llava.train.lm import Tokenized

    region = Sample("s", "Preset_Questions", "open", Q, "Necrosis.", tiles=(0, 1))
    whole = Sample("s", "Preset_Questions", "open", Q, "Necrosis.")
    tok = Tokenized(cued, [region, whole], max_length=512)
    assert tok.ids[0] == cued.prompt(CUE.replace("{question}", Q), "Necrosis.").input_ids
    assert tok.ids[1] == cued.prompt(Q, "Necrosis.").input_ids
    assert tok.ids[0] != tok.ids[1]


def test_train_config_refuses_a_cue_without_the_slot():
    from pydantic import ValidationError

    from wsi_llava.train.config import ModelConfig

    assert ModelConfig(region_prompt=CUE).region_prompt == CUE
    with pytest.raises(ValidationError, match="exactly once"):
        ModelConfig(region_prompt="In the region:")


def test_a_saved_checkpoint_keeps_its_cue(tmp_path):
    from wsi_llava.model.demo import DEMO_WEIGHTS

    folder = tmp_path / "m"
    shutil.copytree(DEMO_WEIGHTS, folder)
    spec = ModelSpec.load(folder)
    spec.region_prompt = CUE
    spec.save(folder)
    assert ModelSpec.load(folder).model_question(Q, "region") == CUE.replace("{question}", Q)
