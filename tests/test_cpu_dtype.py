"""The CPU's default dtype: bf16 where the CPU has bf16 arithmetic, fp32 elsewhere, ``$WSI_LLAVA_CPU_DTYPE``
to fix it; and the demo answering in bf16 on the CPU as it does in fp32, evidence included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi_llava.errors import WsiLlavaError
from wsi_llava.settings import cpu_computes_bf16, default_dtype

Q = "What tissue types are present, and what is the diagnosis?"


@pytest.mark.parametrize(
    ("caps", "want"),
    [
        ({"avx512_bf16": True, "amx_bf16": False}, "bfloat16"),
        ({"avx512_bf16": False, "amx_bf16": True}, "bfloat16"),
        ({"avx2": True, "avx512_bf16": False, "amx_bf16": False}, "float32"),
    ],
)
def test_the_cpu_default_follows_bf16_arithmetic(monkeypatch, caps, want):
    monkeypatch.delenv("WSI_LLAVA_CPU_DTYPE", raising=False)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    assert cpu_computes_bf16() is (want == "bfloat16")
    assert default_dtype("cpu") == want
    assert default_dtype("cuda") == default_dtype("cuda:1") == "bfloat16"
    assert default_dtype("mps") == "float32"


def test_the_environment_fixes_the_cpu_dtype(monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True})
    monkeypatch.setenv("WSI_LLAVA_CPU_DTYPE", "float32")
    assert default_dtype("cpu") == "float32"
    assert default_dtype("cuda") == "bfloat16"  # the CPU's setting only
    monkeypatch.setenv("WSI_LLAVA_CPU_DTYPE", "half")
    with pytest.raises(WsiLlavaError, match=r"WSI_LLAVA_CPU_DTYPE='half': expected one of float32, bfloat16"):
        default_dtype("cpu")


def test_the_demo_answers_alike_in_bf16_on_the_cpu(monkeypatch, world):
    """The default model load in bf16 (as on a bf16 CPU): weights in bf16, the same greedy answer as fp32,
    and evidence that is a distribution over the same tiles, ranked alike."""
    from wsi_llava.session import SlideSession

    slide = sorted((world / "slides").glob("*.tif"))[0]
    answers = {}
    for dtype in ("float32", "bfloat16"):
        monkeypatch.setenv("WSI_LLAVA_CPU_DTYPE", dtype)
        with SlideSession(slide, "demo", device="cpu") as s:
            assert s.model.dtype == getattr(torch, dtype)
            answers[dtype] = s.ask(Q)
    fp32, bf16 = answers["float32"], answers["bfloat16"]
    assert bf16.answer == fp32.answer and bf16.answer
    assert bf16.evidence.tile_indices == fp32.evidence.tile_indices
    a, b = np.asarray(fp32.evidence.scores), np.asarray(bf16.evidence.scores)
    assert np.isfinite(b).all() and b.sum() == pytest.approx(1.0, abs=1e-4)
    top = max(1, len(a) // 10)
    assert len(set(np.argsort(-a)[:top]) & set(np.argsort(-b)[:top])) >= top // 2
    assert np.corrcoef(a, b)[0, 1] > 0.8
