"""A local Hugging Face causal LM as judge (chat template, greedy decoding). Imports torch lazily."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from wsi_llava.eval.judges.base import Messages

logger = logging.getLogger(__name__)


class HFJudge:
    """A causal LM from a local folder (or a packaged id such as ``smollm2-135m-instruct``)."""

    def __init__(
        self, model: str | Path, device: str = "cpu", dtype: str = "float32", max_new_tokens: int = 1024
    ) -> None:
        from wsi_llava.model.llm import load_llm

        self.model_path = str(model)
        self.name = f"hf:{self.model_path}"
        self.llm, self.tokenizer = load_llm(model, dtype=dtype, device=device)
        self.device = device
        self.max_new_tokens = int(max_new_tokens)
        self.concurrency = 1
        self._lock = threading.Lock()

    def complete(self, messages: Messages) -> str:
        import torch

        with self._lock, torch.inference_mode():
            ids = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt"
            )
            if not isinstance(ids, torch.Tensor):  # newer tokenizers may return a BatchEncoding
                ids = ids["input_ids"]
            ids = ids.to(self.device)
            out = self.llm.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            )
            return self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
