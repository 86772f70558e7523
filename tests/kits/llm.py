"""Shared helpers for the model tests: a tiny LLaMA-style tokenizer and a tiny random Llama.

No tests here; ``test_model*.py``, ``test_templates.py`` and ``test_llava_import.py`` import it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "A chat between a curious human and an artificial intelligence assistant. the human's questions.",
    "USER: What is shown in this slide? ASSISTANT: The slide shows tumour cells.",
    "Describe the tissue. Is there necrosis? The tissue is invasive carcinoma with necrosis.",
    "What is the diagnosis? Squamous cell carcinoma, poorly differentiated (grade III).",
    "system user assistant You are a helpful assistant.",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'()-\n",
]


def make_tiny_tokenizer(add_bos: bool = True, chat_template: bool = True):
    """A byte-level BPE tokenizer trained in milliseconds, LLaMA-like: ``<s>`` BOS added, ``</s>`` EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    if add_bos:
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_llama(tokenizer, seed: int = 0, hidden: int = 64):
    """A random 2-layer Llama over ``tokenizer``'s vocabulary (real transformers code)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def make_tiny_wsi_llava(
    llm_dir: Path, template: str = "vicuna_v1", in_dim: int = 32, n_vis: int = 8, seed: int = 0
):
    """A ``WSILlava`` over a tiny Llama saved at ``llm_dir`` (created when missing)."""
    import torch

    from wsi_llava.model.llm import load_llm
    from wsi_llava.model.projector import build_projector
    from wsi_llava.model.spec import LLMSpec, ModelSpec, ProjectorSpec
    from wsi_llava.model.wsi_llava import WSILlava

    if not (llm_dir / "config.json").is_file():
        tok = make_tiny_tokenizer()
        make_tiny_llama(tok, seed=seed).save_pretrained(llm_dir)
        tok.save_pretrained(llm_dir)
    llm, tok = load_llm(llm_dir)
    hidden = llm.config.hidden_size
    torch.manual_seed(seed + 1)
    projector = build_projector("mlp2x_gelu", in_dim, hidden).eval()
    spec = ModelSpec(
        name="tiny",
        llm=LLMSpec(source=str(llm_dir)),
        projector=ProjectorSpec(type="mlp2x_gelu", in_dim=in_dim, out_dim=hidden),
        template=template,
        n_visual_tokens=n_vis,
    )
    return WSILlava(llm, tok, projector, spec)


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny_llm")
    tok = make_tiny_tokenizer()
    make_tiny_llama(tok).save_pretrained(d)
    tok.save_pretrained(d)
    return d
