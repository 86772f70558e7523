"""Prompt templates: LLaVA's ``vicuna_v1`` / ``llava_v1`` and the tokenizer's own chat template.

``build_prompt`` tokenises the text around ``<image>`` separately and puts ``IMAGE_TOKEN_INDEX``
(-200) where the image goes, as LLaVA's ``tokenizer_image_token`` does; ``<image>`` never enters the
vocabulary. With an answer, labels are -100 everywhere except the answer tokens and the end token.
User text never becomes control tokens: the tokenizer's special-token strings are removed from it.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field, replace
from typing import Any

from wsi_llava.errors import ModelError, WsiLlavaError

logger = logging.getLogger(__name__)

IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100
IMAGE_TOKEN = "<image>"

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
TEMPLATES = ("vicuna_v1", "llava_v1", "chat")


@dataclass
class PromptParts:
    """Token ids with one ``IMAGE_TOKEN_INDEX``; ``labels`` only when an answer was given."""

    input_ids: list[int]
    prompt_len: int  # ids before the answer (the generation prompt), placeholder included
    text: str  # the prompt text with ``<image>`` in it (answer excluded)
    labels: list[int] | None = None
    stop_strings: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)  # e.g. the chat template's end-of-turn

    @property
    def image_position(self) -> int:
        return self.input_ids.index(IMAGE_TOKEN_INDEX)


def check_text(text: object, what: str = "question") -> str:
    """``text`` as a ``str`` that is valid Unicode; one clear ``WsiLlavaError`` otherwise.

    Undecodable bytes (e.g. a non-UTF-8 terminal's argv, which Python keeps as lone surrogates) are
    refused here instead of failing deep inside the tokenizer.
    """
    if text is None:
        raise WsiLlavaError(f"{what} is empty")
    text = str(text)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start]
        byte = f"byte {ord(bad) - 0xDC00:#04x}" if 0xDC80 <= ord(bad) <= 0xDCFF else f"{bad!r}"
        raise WsiLlavaError(
            f"{what}: not valid UTF-8 text ({byte} at character {e.start}); "
            "type it in a UTF-8 terminal (e.g. LANG=C.UTF-8) or pass UTF-8 text"
        ) from None
    return text


def control_tokens(tokenizer: Any) -> list[str]:
    """The strings a tokenizer turns into its special tokens (``<|im_start|>``, ``</s>``...), and
    ``<image>``: none of them may come from user text. Longest first."""
    found = {IMAGE_TOKEN, *(str(t) for t in getattr(tokenizer, "all_special_tokens", []) or [])}
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    found.update(str(t.content) for t in added.values() if getattr(t, "special", False))
    return sorted((t for t in found if t), key=len, reverse=True)


def strip_control_tokens(tokenizer: Any, text: str, what: str = "question") -> str:
    """``text`` without any control-token string: typed ``<|im_end|><|im_start|>assistant`` would otherwise
    become real chat turns (a fake answer). Repeated until none is left, as removing one can join another."""
    tokens = control_tokens(tokenizer)
    out = text
    while True:
        cleaned = out
        for t in tokens:
            cleaned = cleaned.replace(t, "")
        if cleaned == out:
            break
        out = cleaned
    if out != text:
        _warn_stripped(what, " ".join(sorted({t for t in tokens if t in text})), text)
    return out


@functools.lru_cache(maxsize=32)
def _warn_stripped(what: str, removed: str, text: str) -> None:
    """Say once per text (a question is prompted several times: checks, answer, evidence) what was removed."""
    logger.warning("%s: removed control tokens %s from the text", what, removed)


def _clean_question(question: str, tokenizer: Any) -> str:
    q = strip_control_tokens(tokenizer, check_text(question)).strip()
    if not q:
        raise WsiLlavaError("question is empty")
    return q


def _encode(tokenizer: Any, text: str) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts a BOS token in front by default (LLaMA does, GPT-2 style ones do not)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    return bool(with_special) and with_special[0] == bos and _encode(tokenizer, "a")[:1] != [bos]


def prompt_text(template: str, tokenizer: Any, question: str) -> str:
    """The generation prompt as text, with ``<image>`` where the visual tokens go (user text holds no
    control tokens)."""
    q = _clean_question(question, tokenizer)
    user = f"{IMAGE_TOKEN}\n{q}"
    if template in ("vicuna_v1", "llava_v1"):
        system = VICUNA_SYSTEM if template == "vicuna_v1" else LLAVA_V1_SYSTEM
        return f"{system} USER: {user} ASSISTANT:"
    if template == "chat":
        return _chat(tokenizer, [{"role": "user", "content": user}], generation=True)
    raise ModelError(f"template {template!r}: expected one of {', '.join(TEMPLATES)}")


def _chat(tokenizer: Any, messages: list[dict[str, str]], generation: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            f"template 'chat': the tokenizer {type(tokenizer).__name__} has no chat_template; "
            "use template 'vicuna_v1' or a tokenizer that ships one"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _answer_suffix(template: str, tokenizer: Any, question: str, prompt: str, answer: str) -> str:
    eos = tokenizer.eos_token or ""
    if template in ("vicuna_v1", "llava_v1"):
        return f" {answer}{eos}"
    q = _clean_question(question, tokenizer)
    full = _chat(
        tokenizer,
        [{"role": "user", "content": f"{IMAGE_TOKEN}\n{q}"}, {"role": "assistant", "content": answer}],
        generation=False,
    )
    if not full.startswith(prompt):
        raise ModelError(
            "template 'chat': the tokenizer's chat template does not render the answer after the "
            "generation prompt; use template 'vicuna_v1'"
        )
    suffix = full[len(prompt) :].rstrip()
    if eos and eos in suffix:  # drop what follows the end-of-turn token (e.g. a trailing newline)
        suffix = suffix[: suffix.rindex(eos) + len(eos)]
    return suffix


def _special_ids(tokenizer: Any) -> set[int]:
    return {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}


def chat_end_of_turn(tokenizer: Any) -> int | None:
    """The special token the chat template closes an assistant turn with (``<|im_end|>``...), if any."""
    prompt = _chat(tokenizer, [{"role": "user", "content": "x"}], generation=True)
    full = _chat(
        tokenizer, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], generation=False
    )
    if not full.startswith(prompt):
        return None
    specials = _special_ids(tokenizer)
    ids = [i for i in _encode(tokenizer, full[len(prompt) :].rstrip()) if i in specials]
    return ids[-1] if ids else None


def build_prompt(template: str, tokenizer: Any, question: str, answer: str | None = None) -> PromptParts:
    """Token ids for ``question`` (and ``answer`` when training) with -200 at ``<image>``."""
    text = prompt_text(template, tokenizer, question)
    before, after = text.split(IMAGE_TOKEN, 1)
    ids_before = _encode(tokenizer, before)
    if template != "chat" and _adds_bos(tokenizer):
        ids_before = [tokenizer.bos_token_id, *ids_before]
    ids_after = _encode(tokenizer, after)
    prompt_ids = [*ids_before, IMAGE_TOKEN_INDEX, *ids_after]
    stops = ["</s>"] if template in ("vicuna_v1", "llava_v1") else []
    end_ids: list[int] = []
    if template == "chat":
        end = chat_end_of_turn(tokenizer)
        end_ids = [end] if end is not None else []
    prompt = PromptParts(
        input_ids=prompt_ids,
        prompt_len=len(prompt_ids),
        text=text,
        stop_strings=stops,
        stop_token_ids=end_ids,
    )
    if answer is None:
        return prompt
    answer = strip_control_tokens(tokenizer, check_text(answer, "answer"), "answer").strip()
    if not answer:
        raise WsiLlavaError("answer is empty")
    suffix = _answer_suffix(template, tokenizer, question, text, answer)
    # tokenise prompt tail + answer together (as LLaVA tokenises the whole conversation), then split
    joint = _encode(tokenizer, after + suffix)
    if joint[: len(ids_after)] == ids_after and len(joint) > len(ids_after):
        answer_ids = joint[len(ids_after) :]
    else:
        answer_ids = _encode(tokenizer, suffix)
    eos_id = tokenizer.eos_token_id
    ends = {*end_ids, *([eos_id] if eos_id is not None else [])}
    if eos_id is not None and (not answer_ids or answer_ids[-1] not in ends):
        answer_ids.append(eos_id)
    labels = [IGNORE_INDEX] * len(prompt_ids) + list(answer_ids)
    return replace(prompt, input_ids=[*prompt_ids, *answer_ids], labels=labels)
