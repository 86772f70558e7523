"""SentencePiece-only tokenizer folders, as llava-v1.5-7b and vicuna-7b-v1.5 ship them (no tokenizer.json).

The SentencePiece model is trained here the way Llama's was (BPE, byte fallback, digits split, dummy
prefix, no whitespace folding); the prompts ``build_prompt`` makes must encode to exactly what the
SentencePiece model itself gives, with BOS first, and decode back.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from kits.llava import (
    half_round,
    lora_projector,
    merged_with_lora,
    our_logits,
    random_projector,
    reference_logits,
    vicuna_config,
    write_lora,
    write_sentencepiece_folder,
    write_shards,
)
from kits.llm import make_tiny_llama

from wsi_llava.errors import ModelError
from wsi_llava.model import llava_import
from wsi_llava.model.templates import IMAGE_TOKEN_INDEX, build_prompt

QUESTIONS = [
    "What is the diagnosis?",
    "Is there necrosis in  the tumour (grade III)?",
    "Estimate ≥5 mitoses/mm², Ki-67 ~30 %: naïve count 12345?",
]
ANSWER = "Squamous cell carcinoma, poorly differentiated."


@pytest.fixture(scope="module")
def sp_folder(tmp_path_factory) -> Path:
    return write_sentencepiece_folder(tmp_path_factory.mktemp("sp") / "llava-v1.5-7b-tokenizer")


@pytest.fixture(scope="module")
def sp(sp_folder):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(sp_folder / "tokenizer.model"))


def test_folder_has_no_tokenizer_json(sp_folder):
    assert sorted(p.name for p in sp_folder.iterdir()) == [
        "special_tokens_map.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]


@pytest.mark.parametrize("template", ["llava_v1", "vicuna_v1"])
def test_prompt_ids_are_the_sentencepiece_encoding(sp_folder, sp, template):
    tok = llava_import.load_tokenizer(sp_folder)
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (sp.bos_id(), sp.eos_id(), sp.unk_id())
    assert len(tok) == sp.get_piece_size()
    for q in QUESTIONS:
        parts = build_prompt(template, tok, q)
        before, after = parts.text.split("<image>")
        want = [sp.bos_id(), *sp.encode(before), IMAGE_TOKEN_INDEX, *sp.encode(after)]
        assert parts.input_ids == want, q
        # training: prompt + answer + </s> as one conversation, loss on the answer only
        train = build_prompt(template, tok, q, answer=ANSWER)
        full = [
            sp.bos_id(),
            *sp.encode(before),
            IMAGE_TOKEN_INDEX,
            *sp.encode(after + " " + ANSWER),
            sp.eos_id(),
        ]
        assert train.input_ids == full, q
        n = train.prompt_len
        assert train.labels == [-100] * n + full[n:]
        assert tok.decode(full[n:], skip_special_tokens=True).strip() == ANSWER


def test_decoding_round_trips(sp_folder, sp):
    tok = llava_import.load_tokenizer(sp_folder)
    for text in [*QUESTIONS, "ASSISTANT: The slide shows tumour cells.\nUSER: and?", "µm 0.25 — Ω"]:
        ids = tok(text, add_special_tokens=True)["input_ids"]
        assert ids == [sp.bos_id(), *sp.encode(text)]
        assert tok.decode(ids, skip_special_tokens=True) == sp.decode(ids[1:]) == text
    assert any(sp.id_to_piece(i).startswith("<0x") for i in sp.encode("Ω")), "byte fallback not exercised"


def test_first_folder_that_has_a_tokenizer(sp_folder, tmp_path):
    empty = tmp_path / "lora-run"
    empty.mkdir()
    tok = llava_import.load_tokenizer(empty, sp_folder)
    assert tok("What")["input_ids"][0] == 1
    with pytest.raises(ModelError, match=r"no tokenizer could be loaded: .*lora-run: no tokenizer files"):
        llava_import.load_tokenizer(empty)


def test_missing_protobuf_is_named(sp_folder, monkeypatch):
    monkeypatch.setattr(llava_import, "_protobuf_missing", lambda: True)
    with pytest.raises(
        ModelError, match=r"tokenizer\.model \(SentencePiece\) without tokenizer\.json needs the protobuf"
    ):
        llava_import.load_tokenizer(sp_folder)


def test_lora_over_vicuna_with_a_sentencepiece_tokenizer(sp_folder, tmp_path):
    """The LoRA run ships no tokenizer: the base's SentencePiece-only one is used, end to end."""
    tok = llava_import.load_tokenizer(sp_folder)
    g = torch.Generator().manual_seed(3)
    llm = {
        k: v + 0.02 * torch.randn(v.shape, generator=g)
        for k, v in make_tiny_llama(tok, seed=9).state_dict().items()
    }
    world = {"tok": tok, "llm": llm, "proj": random_projector(g), "vis": torch.randn(576, 1024, generator=g)}
    base = tmp_path / "vicuna-7b-v1.5"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(vicuna_config(len(tok))))
    write_shards(base, {k: v.half() for k, v in llm.items()}, "bin")
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(sp_folder / name, base / name)
    folder = write_lora(world, tmp_path / "lora", "bin")
    info = llava_import.inspect_llava(folder, base)
    assert info.tokenizer_folder == base and info.vocab_size == len(tok)
    model = llava_import.load_llava(folder, model_base=base, dtype="float32")
    assert type(model.tokenizer).__name__ == "LlamaTokenizer"
    want = reference_logits(world, merged_with_lora(world, 8, 16), half_round(lora_projector(world)))
    torch.testing.assert_close(our_logits(model, world), want, rtol=1e-4, atol=1e-4)
