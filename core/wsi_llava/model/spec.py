"""``ModelSpec``: what a wsi-llava checkpoint is made of, saved as ``wsi_llava.json`` in its folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from wsi_llava.errors import ModelError

SPEC_FILE = "wsi_llava.json"

TemplateName = Literal["vicuna_v1", "llava_v1", "chat"]
Scope = Literal["slide", "region"]
#: where the question goes in ``ModelSpec.region_prompt``
QUESTION_SLOT = "{question}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TileEncoderSpec(_Strict):
    """Which tile encoder makes the tile features.

    Either a registered encoder ``name`` with optional ``weights`` (None: random, or built into the
    checkpoint), or a timm hub folder ``source`` (``config.json`` + weights: Prov-GigaPath, UNI, ...),
    a local path or a Hugging Face repo id resolved from the local cache (:mod:`wsi_llava.sources`).
    """

    name: str = "prov-gigapath"
    weights: str | None = None
    source: str | None = Field(None, description="timm hub folder: local path or hf://ORG/NAME")
    timm_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="extra timm.create_model arguments a model card asks for (dotted names become objects)",
    )
    embed_dim: int | None = Field(None, gt=0, description="feature width, recorded when the model is added")


class TilingSpec(_Strict):
    """How tiles are cut: edge in pixels at the target resolution."""

    target_mpp: float = Field(0.5, gt=0)
    tile_size: int = Field(256, gt=0)


class ProjectorSpec(_Strict):
    """The visual projector: ``mlp2x_gelu`` (LLaVA-1.5) or ``linear``; in_dim is the visual token width."""

    type: Literal["mlp2x_gelu", "linear"] = "mlp2x_gelu"
    in_dim: int = Field(1024, gt=0)
    out_dim: int = Field(4096, gt=0)


class LLMSpec(_Strict):
    """The language model and where the projector comes from.

    ``format``: ``hf``, a Hugging Face causal-LM folder or a package id such as ``smollm2-135m-instruct``
    (projector and LoRA from this checkpoint's own files); ``llava``, an official LLaVA-format checkpoint
    (merged, LoRA + ``non_lora_trainables.bin`` or ``mm_projector.bin`` over ``base``) that brings its
    projector; ``wsi-llava``, another checkpoint of ours that brings LLM, LoRA and projector (``base``
    replaces the LLM folder it names). Sources are local paths or ``hf://ORG/NAME`` repo ids.
    """

    source: str
    format: Literal["hf", "llava", "wsi-llava"] = "hf"
    base: str | None = Field(None, description="base LLM folder for a LoRA or projector-only source")


class GenerationSpec(_Strict):
    """Default decoding settings; temperature 0 means greedy."""

    max_new_tokens: int = Field(512, gt=0)
    temperature: float = Field(0.0, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    no_repeat_ngram_size: int | None = Field(None, ge=1)

    def with_overrides(self, **overrides: Any) -> GenerationSpec:
        """These settings with the given (non-None) ones replaced, validated: a bad value raises
        ``ModelError`` naming the setting (e.g. ``temperature must be ... got inf``)."""
        data = {**self.model_dump(), **{k: v for k, v in overrides.items() if v is not None}}
        try:
            return GenerationSpec.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(p) for p in err["loc"])
            raise ModelError(
                f"{field} {GENERATION_RULES.get(field, 'is invalid')}, got {err.get('input')!r}"
            ) from None


#: what each decoding setting accepts, in the words error messages use
GENERATION_RULES = {
    "max_new_tokens": "must be a whole number >= 1",
    "temperature": "must be a finite number >= 0 (0 = greedy)",
    "top_p": "must be a number in (0, 1]",
    "no_repeat_ngram_size": "must be a whole number >= 1",
}


class ModelSpec(_Strict):
    """Everything needed to rebuild a ``WSILlava`` from a checkpoint folder (except the weights)."""

    name: str
    description: str | None = None
    version: str = "0.1.0"
    demo: bool = False
    untrained: bool = False
    tile_encoder: TileEncoderSpec = Field(default_factory=TileEncoderSpec)
    tiling: TilingSpec = Field(default_factory=TilingSpec)
    slide_encoder: dict[str, Any] | None = Field(
        None, description="SlideEncoderConfig fields; None when visual tokens come precomputed (576x1024)"
    )
    slide_encoder_weights: str | None = Field(
        None,
        description="Prov-GigaPath slide_encoder.pth (local path or hf://ORG/NAME/FILE); "
        "None: slide_encoder.safetensors of this checkpoint",
    )
    projector: ProjectorSpec = Field(default_factory=ProjectorSpec)
    llm: LLMSpec
    template: TemplateName = "vicuna_v1"
    lora: str | None = Field(None, description="peft adapter subfolder of the checkpoint, e.g. 'lora'")
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    n_visual_tokens: int = Field(576, gt=0, description="visual tokens per slide or region")
    feature_stats: str | None = Field(
        None,
        description="training tile-feature statistics of this checkpoint (`train feature-stats`); answers on "
        "tiles far from them carry a warning. None: no such check",
    )
    region_prompt: str = Field(
        QUESTION_SLOT,
        description="how a question about a region (not the whole slide) reaches the LLM: the question "
        "replaces {question}; a model trained with a scope cue (e.g. 'In the selected region: {question}') "
        "is asked with the same cue. Default: the question unchanged, as the paper's model was trained",
    )

    @field_validator("region_prompt")
    @classmethod
    def _one_question_slot(cls, v: str) -> str:
        if v.count(QUESTION_SLOT) != 1:
            raise ValueError(f"must hold {QUESTION_SLOT} exactly once, got {v!r}")
        return v

    def model_question(self, question: str, scope: Scope = "slide") -> str:
        """The question as this model is asked it: a region question carries ``region_prompt``'s cue.

        The one place the scope reaches the prompt: answers, evidence, the server and training all call it.
        """
        if scope == "region":
            return self.region_prompt.replace(QUESTION_SLOT, question)
        return question

    @model_validator(mode="before")
    @classmethod
    def _visual_tokens_from_slide_encoder(cls, data: Any) -> Any:
        """``n_visual_tokens`` is the one name for the visual-token count; with a slide encoder it is derived.

        The slide encoder's ``n_tokens`` (its pooled bins, 576 by default) decides how many tokens reach the
        LLM, so it wins over a stored ``n_visual_tokens``: session, evidence and evaluation then read one
        number. ``n_visual_tokens`` stays a stored field for models without a slide encoder (precomputed
        tokens) and so that existing ``wsi_llava.json`` files load unchanged.
        """
        if isinstance(data, dict) and isinstance(data.get("slide_encoder"), dict):
            data = {**data, "n_visual_tokens": int(data["slide_encoder"].get("n_tokens", 576))}
        return data

    def save(self, folder: str | Path) -> Path:
        """Write ``wsi_llava.json`` into ``folder``."""
        path = Path(folder) / SPEC_FILE
        path.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> ModelSpec:
        """Read ``wsi_llava.json`` from ``folder``; bad content raises ``ModelError`` naming the field."""
        path = Path(folder) / SPEC_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelError(f"{path}: not found") from None
        except UnicodeDecodeError as e:
            raise ModelError(
                f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})"
            ) from None
        except OSError as e:
            raise ModelError(f"{path}: cannot read it ({e.strerror or e})") from None
        except json.JSONDecodeError as e:
            raise ModelError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in e.errors()
            )
            raise ModelError(f"{path}: invalid model spec: {problems}") from None
