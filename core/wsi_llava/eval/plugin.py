"""Built-in judges, registered through the ``register_judges`` hook like third-party ones.

Importing this module does not import torch: the HF judge loads its model when it is built.
"""

from __future__ import annotations

from typing import Any

from wsi_llava.hookspecs import hookimpl


def _openai(model: str, **options: Any):
    from wsi_llava.eval.judges.openai import OpenAIJudge

    keep = (
        "url",
        "key_env",
        "timeout",
        "retries",
        "backoff",
        "max_backoff",
        "concurrency",
        "temperature",
        "max_tokens",
    )
    return OpenAIJudge(model, **{k: v for k, v in options.items() if k in keep and v is not None})


def _hf(model: str, **options: Any):
    from wsi_llava.eval.judges.hf import HFJudge

    keep = ("device", "dtype", "max_new_tokens")
    return HFJudge(model, **{k: v for k, v in options.items() if k in keep and v is not None})


@hookimpl
def register_judges(register):
    register(
        "openai", _openai, description="OpenAI-compatible /v1/chat/completions server (key from an env var)"
    )
    register("hf", _hf, description="local Hugging Face causal LM (folder or packaged id), greedy")
