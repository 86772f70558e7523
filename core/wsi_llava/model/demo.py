"""The embedded demo model ``wsi-llava-demo``: demo-vit tiles -> small LongNet -> projector -> SmolLM2-135M.

The trained checkpoint ships in ``demo_weights/`` (re-created by ``scripts/train_demo.sh``); without it
(a stripped install) the slide encoder and projector are seeded random initialisations and the spec
says ``untrained=True``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from wsi_llava.model.spec import (
    GenerationSpec,
    LLMSpec,
    ModelSpec,
    ProjectorSpec,
    TileEncoderSpec,
    TilingSpec,
)

logger = logging.getLogger(__name__)

DEMO_NAME = "wsi-llava-demo"
DEMO_LLM = "smollm2-135m-instruct"
DEMO_LLM_HIDDEN = 576
DEMO_TILE_DIM = 192
DEMO_SEED = 20241203
#: package data: the trained demo checkpoint (our format)
DEMO_WEIGHTS = Path(__file__).parent / "demo_weights"


def demo_spec() -> ModelSpec:
    """The demo's spec (no torch needed)."""
    from wsi_llava.slide_encoder.config import SlideEncoderConfig

    se = SlideEncoderConfig.demo(in_dim=DEMO_TILE_DIM)
    return ModelSpec(
        name=DEMO_NAME,
        demo=True,
        untrained=True,
        tile_encoder=TileEncoderSpec(name="demo-vit", weights=None),
        tiling=TilingSpec(target_mpp=0.5, tile_size=256),
        slide_encoder=se.model_dump(mode="json"),
        projector=ProjectorSpec(type="mlp2x_gelu", in_dim=se.out_dim, out_dim=DEMO_LLM_HIDDEN),
        llm=LLMSpec(source=DEMO_LLM),
        template="chat",
        generation=GenerationSpec(max_new_tokens=128, temperature=0.0, no_repeat_ngram_size=3),
        n_visual_tokens=se.n_tokens,
    )


def build_untrained_demo(device: str = "cpu", dtype: Any = None) -> Any:
    """The demo with seeded random slide encoder and projector on the real SmolLM2-135M-Instruct."""
    import torch

    from wsi_llava.model.llm import load_llm, torch_dtype
    from wsi_llava.model.projector import build_projector
    from wsi_llava.model.wsi_llava import WSILlava
    from wsi_llava.settings import default_dtype
    from wsi_llava.slide_encoder.slide_encoder import SlideEncoder, SlideEncoderConfig

    spec = demo_spec()
    tdtype = torch_dtype(dtype or default_dtype(device))
    llm, tokenizer = load_llm(spec.llm.source, dtype=tdtype, device=device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DEMO_SEED)
        slide_encoder = SlideEncoder(SlideEncoderConfig(**spec.slide_encoder))
        projector = build_projector(spec.projector.type, spec.projector.in_dim, spec.projector.out_dim)
    with torch.no_grad():
        # Zero-initialise the projector's output layer (as zero-init adapters do): an untrained projector
        # then adds silent visual tokens and the LLM answers fluently from the text alone, instead of
        # being derailed by 576 random embeddings. Training moves it away from zero from the first step.
        last = projector[-1] if isinstance(projector, torch.nn.Sequential) else projector
        last.weight.zero_()
        last.bias.zero_()
    projector.to(device=device, dtype=tdtype).eval()
    slide_encoder.to(device=device, dtype=torch.float32).eval()
    return WSILlava(llm, tokenizer, projector, spec, slide_encoder=slide_encoder)


def demo_checkpoint() -> tuple[ModelSpec, Path | None]:
    """The demo's spec and checkpoint folder: the shipped trained one, else the untrained spec (no folder)."""
    from wsi_llava.model.spec import SPEC_FILE

    if (DEMO_WEIGHTS / SPEC_FILE).is_file():
        return ModelSpec.load(DEMO_WEIGHTS), DEMO_WEIGHTS
    return demo_spec(), None


def load_demo(device: str = "cpu", dtype: Any = None) -> Any:
    """The trained demo checkpoint when it ships, else the untrained (seeded) demo."""
    _, folder = demo_checkpoint()
    if folder is not None:
        from wsi_llava.model.checkpoint import load_checkpoint

        return load_checkpoint(folder, device=device, dtype=dtype)
    logger.info("no trained demo weights in %s: using the untrained demo", DEMO_WEIGHTS)
    return build_untrained_demo(device=device, dtype=dtype)
