"""Judges for WSI-Precision / WSI-Relevance: chat models behind one small interface, plus a call cache.

Built-in kinds (registered in ``wsi_llava.eval.plugin``): ``openai`` (any OpenAI-compatible
``/v1/chat/completions`` server) and ``hf`` (a local Hugging Face causal LM). Spec syntax:
``openai:gpt-4o-mini``, ``hf:/path/to/model-folder``.
"""

from wsi_llava.eval.judges.base import (
    CachedJudge,
    Judge,
    JudgeCache,
    JudgeError,
    make_judge,
    parse_judge_spec,
)

__all__ = ["CachedJudge", "Judge", "JudgeCache", "JudgeError", "make_judge", "parse_judge_spec"]
