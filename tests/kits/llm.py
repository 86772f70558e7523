"""Tiny language models for the tests: byte-level BPE tokenizers trained in milliseconds, random 2-layer Llamas.

Real tokenizer and model code throughout (``tokenizers``, transformers' ``LlamaForCausalLM``); nothing is
downloaded. ``smollm2_tokenizer`` is the demo model's tokenizer, from its local files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def train_bpe(texts: list[str], specials: list[str], vocab_size: int = 400):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``texts``; ``specials`` take the first ids, in order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def make_tiny_tokenizer(add_bos: bool = True, chat_template: bool = True):
    """A byte-level BPE tokenizer trained in milliseconds, LLaMA-like: ``<s>`` BOS added, ``</s>`` EOS."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = train_bpe(CORPUS * 4, ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"])
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


def tiny_llama_config(tokenizer, hidden: int = 64, **overrides: Any):
    """A 2-layer ``LlamaConfig`` (4 heads, 2 KV heads) over ``tokenizer``'s vocabulary, BOS and EOS."""
    from transformers import LlamaConfig

    sizes = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    return LlamaConfig(
        **sizes, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **overrides
    )


def make_tiny_llama(tokenizer, seed: int = 0, hidden: int = 64):
    """A random 2-layer Llama over ``tokenizer``'s vocabulary (real transformers code)."""
    import torch
    from transformers import LlamaForCausalLM

    cfg = tiny_llama_config(
        tokenizer,
        hidden,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_tiny_chat_llm(folder: Path, seed: int = 0) -> Path:
    """``make_tiny_llama`` over ``make_tiny_tokenizer``, both saved at ``folder`` (a model folder to load)."""
    tok = make_tiny_tokenizer()
    make_tiny_llama(tok, seed=seed).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def save_tiny_llm(folder: Path, tokenizer, seed: int = 0, **config: Any) -> Path:
    """A random 2-layer Llama (``tiny_llama_config`` + ``config``) saved with ``tokenizer`` at ``folder``."""
    import torch
    from transformers import LlamaForCausalLM

    cfg = tiny_llama_config(tokenizer, **config)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer and chat template (the demo model's, from its local files)."""
    from transformers import AutoTokenizer

    from wsi_llava.model.llm import resolve_llm_source

    return AutoTokenizer.from_pretrained(
        str(resolve_llm_source("smollm2-135m-instruct")), local_files_only=True
    )


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
        save_tiny_chat_llm(llm_dir, seed=seed)
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
