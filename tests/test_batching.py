"""Continuous batching (``wsi_llava.model.batching``) against answering alone with ``WSILlava.stream``.

CPU: the batched step runs eagerly (the CUDA-graph buckets run on the GPU benchmark). The demo model
(SmolLM2-135M) answers with random visual tokens; every batched answer must equal its alone run.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from wsi_llava.model.batching import Batcher

QUESTIONS = [
    "Describe the tissue.",
    "What is shown in this slide?",
    "Is there necrosis?",
    "What is the diagnosis?",
    "Which cells dominate this region?",
    "Is the tumour invasive?",
    "Describe the stroma.",
    "What grade is this carcinoma?",
    "Are there mitoses?",
]


@pytest.fixture(scope="module")
def demo():
    from wsi_llava.model import load_model

    return load_model("demo", device="cpu")


def _visual(model, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(model.n_visual_tokens, model.spec.projector.in_dim, generator=g)


def _alone(model, question, vis, **kw):
    chunks = list(model.stream(question, vis, **kw))
    return chunks, model.last_generation


def _same(chunks, result, ref) -> None:
    ref_chunks, ref_result = ref
    assert chunks == ref_chunks
    assert result is not None
    assert (result.text, result.new_token_ids, result.stop_reason) == (
        ref_result.text,
        ref_result.new_token_ids,
        ref_result.stop_reason,
    )
    assert result.text == "".join(chunks) and result.n_new_tokens == len(result.new_token_ids)
    assert result.prompt_len == ref_result.prompt_len


def _consume(stream, into: list, errors: list) -> threading.Thread:
    def run() -> None:
        try:
            into.extend(stream)
        except Exception as e:  # surfaced by the test thread
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    return t


def _no_batcher_threads() -> bool:
    return not any(t.name == "wsi-batcher" for t in threading.enumerate())


def test_concurrent_staggered_answers_equal_answering_alone(demo):
    """Nine answers, joining at different times, consumed from several threads: each equals its alone run."""
    reqs = []
    for i, q in enumerate(QUESTIONS):
        kw = {"max_new_tokens": 4 + (i * 3) % 9}
        if i == 5:
            kw.update(temperature=0.8, top_p=0.9, seed=7)
        reqs.append((q, _visual(demo, 100 + i), kw))
    refs = [_alone(demo, q, v, **kw) for q, v, kw in reqs]
    # the longest answer goes first, so that the later ones join while it is mid-answer
    order = sorted(range(len(reqs)), key=lambda i: -len(refs[i][1].new_token_ids))
    assert len(refs[order[0]][1].new_token_ids) >= 4
    assert len({tuple(r[1].new_token_ids) for r in refs}) > 3  # different answers, not one repeated
    assert {r[1].stop_reason for r in refs} >= {"max_tokens"}

    got: dict[int, list[str]] = {i: [] for i in order}
    streams, threads, errors = {}, [], []
    with Batcher(demo, max_batch=4) as batcher:
        first = order[0]
        q, v, kw = reqs[first]
        streams[first] = batcher.submit(q, v, **kw)
        got[first].append(next(streams[first]))  # it is decoding now
        for n, i in enumerate(order[1:]):
            q, v, kw = reqs[i]
            streams[i] = batcher.submit(q, v, **kw)
            threads.append(_consume(streams[i], got[i], errors))
            if n == 3:
                got[first].append(next(streams[first], ""))
                time.sleep(0.05)
        threads.append(_consume(streams[first], got[first], errors))
        for t in threads:
            t.join(60)
        assert not errors
        assert batcher.active == 0 and batcher.waiting == 0
    for i in order:
        _same([c for c in got[i] if c], streams[i].result, refs[i])
        assert streams[i].result.decode_path == "batched"
    assert _no_batcher_threads()
