"""A model's parts checked before anything is loaded: files, shapes and widths across the chain.

tile encoder (timm hub folder) -> slide encoder (Prov-GigaPath ``slide_encoder.pth``) -> 576-token pooling
-> LayerNorm -> zero-pad to the projector's input (LLaVA ``mm_hidden_size``) -> projector -> LLM.
Everything here reads configs and weight-file headers only, so checking a 7B model takes seconds.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Required, TypedDict

from pydantic import BaseModel, ConfigDict, Field

from wsi_llava.errors import ModelError
from wsi_llava.model import llava_import
from wsi_llava.model.build import SLIDE_ENCODER_FILE as OWN_SLIDE_ENCODER
from wsi_llava.model.build import inner_source
from wsi_llava.model.spec import (
    SPEC_FILE,
    GenerationSpec,
    LLMSpec,
    ModelSpec,
    ProjectorSpec,
    TileEncoderSpec,
    TilingSpec,
)
from wsi_llava.sources import canonical_source, join_source, resolve_source

logger = logging.getLogger(__name__)

#: decoding defaults of the official LLaVA-format checkpoints (greedy; model_vqa.py's n-gram block)
LLAVA_GENERATION = GenerationSpec(max_new_tokens=1024, temperature=0.0, no_repeat_ngram_size=3)
SLIDE_ENCODER_FILE = "slide_encoder.pth"


class PartReport(BaseModel):
    """One part: where it comes from, where that is on this machine, and what it holds."""

    model_config = ConfigDict(extra="forbid")

    part: str
    source: str
    path: str
    summary: str


class ModelReport(BaseModel):
    """The result of checking a model: its parts and the width checks that passed."""

    model_config = ConfigDict(extra="forbid")

    name: str
    folder: str | None = None
    parts: list[PartReport] = Field(default_factory=list)
    widths: list[str] = Field(default_factory=list)

    def add(self, part: str, source: str, path: str | Path, summary: str) -> None:
        """Record one checked part."""
        self.parts.append(PartReport(part=part, source=source, path=str(path), summary=summary))


class LanguageInfo(BaseModel):
    """The LLM + projector side of a model, read from configs and headers."""

    model_config = ConfigDict(extra="forbid")

    format: str
    kind: str
    hidden: int
    projector_type: str
    projector_in: int
    projector_out: int
    template: str
    generation: GenerationSpec
    summary: str
    #: a wsi-llava checkpoint's own (stage-1 tuned) slide encoder: its config, when it has the weights
    slide_encoder: dict[str, Any] | None = None


def spec_sources(spec: ModelSpec) -> dict[str, str]:
    """The external sources a spec names (part -> source), as stored."""
    out = {}
    if spec.llm.format != "hf" or Path(spec.llm.source).is_absolute() or spec.llm.source.startswith("hf://"):
        out["LLM" if spec.llm.format == "hf" else "LLaVA"] = spec.llm.source
    if spec.llm.base:
        out["LLaVA base"] = spec.llm.base
    if spec.tile_encoder.source:
        out["tile encoder"] = spec.tile_encoder.source
    if spec.slide_encoder_weights:
        out["slide encoder"] = spec.slide_encoder_weights
    return out


def _hidden_of_folder(folder: Path) -> int:
    cfg_path = folder / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        return int(cfg.get("hidden_size") or cfg["text_config"]["hidden_size"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ModelError(f"{cfg_path}: cannot read the LLM's hidden_size") from None


def inspect_language(source: str, base: str | None) -> LanguageInfo:
    """The LLM side of ``source``: a LLaVA-format checkpoint (over ``base``) or one of our checkpoints."""
    path = resolve_source(source, "LLaVA")
    base_path = resolve_source(base, "LLaVA base") if base else None
    if (path / SPEC_FILE).is_file():
        inner = ModelSpec.load(path)
        if inner.demo:
            raise ModelError(
                f"--llava {path}: a demo checkpoint; give a LLaVA-format or paper-model checkpoint"
            )
        if base_path is not None:
            llm_path, llm_base = base_path, None
        else:
            llm_path = inner_source(path, inner.llm.source, "LLM")
            llm_base = inner_source(path, inner.llm.base, "LLM base") if inner.llm.base else None
        hidden = (
            llava_import.inspect_llava(llm_path, llm_base).hidden_size
            if llava_import.is_llava_checkpoint(llm_path)
            else _hidden_of_folder(llm_path)
        )
        own_se = inner.slide_encoder if (path / OWN_SLIDE_ENCODER).is_file() else None
        proj = path / "projector.safetensors"
        if not proj.is_file():
            raise ModelError(f"{path}: no projector.safetensors (expected a trained wsi-llava checkpoint)")
        return LanguageInfo(
            format="wsi-llava",
            kind="lora" if inner.lora else "full",
            hidden=hidden,
            projector_type=inner.projector.type,
            projector_in=inner.projector.in_dim,
            projector_out=inner.projector.out_dim,
            template=inner.template,
            generation=inner.generation,
            summary=f"wsi-llava checkpoint {inner.name!r} (LLM {llm_path}, {inner.projector.type} "
            f"{inner.projector.in_dim}->{inner.projector.out_dim}{', LoRA' if inner.lora else ''})",
            slide_encoder=own_se,
        )
    if not llava_import.is_llava_checkpoint(path):
        raise ModelError(
            f"--llava {path}: not a LLaVA checkpoint (expected config.json of a LlavaLlamaForCausalLM with "
            "mm_projector_type / mm_hidden_size, or adapter_config.json + non_lora_trainables.bin, or "
            f"mm_projector.bin) nor a wsi-llava checkpoint ({SPEC_FILE})"
        )
    info = llava_import.inspect_llava(path, base_path)
    return LanguageInfo(
        format="llava",
        kind=info.kind,
        hidden=info.hidden_size,
        projector_type=info.projector_type,
        projector_in=info.projector_in,
        projector_out=info.projector_out,
        template="llava_v1",
        generation=LLAVA_GENERATION,
        summary=f"LLaVA {info.kind} checkpoint, {info.num_hidden_layers} layers x {info.hidden_size}, "
        f"{info.n_params:,} parameters, {info.projector_type} {info.projector_in}->{info.projector_out}, "
        f"tokenizer from {info.tokenizer_folder}",
    )


def _slide_encoder_config(path: Path, lang: LanguageInfo) -> Any:
    """The slide encoder's config: from a wsi-llava checkpoint's spec beside its own weights file, else
    read from Prov-GigaPath's ``slide_encoder.pth`` (576 tokens, zero-padded to the projector input)."""
    from wsi_llava.slide_encoder.longnet import gigapath_config
    from wsi_llava.slide_encoder.slide_encoder import SlideEncoderConfig

    if path.suffix == ".safetensors":
        spec_file = path.parent / SPEC_FILE
        if not spec_file.is_file():
            raise ModelError(
                f"{path}: a slide encoder in safetensors needs the {SPEC_FILE} of its wsi-llava checkpoint "
                "beside it (or pass Prov-GigaPath's slide_encoder.pth)"
            )
        own = ModelSpec.load(path.parent).slide_encoder
        if own is None:
            raise ModelError(f"{spec_file}: names no slide encoder")
        import torch

        from wsi_llava.features.weights import check_fits, read_shapes
        from wsi_llava.slide_encoder.slide_encoder import SlideEncoder

        try:
            cfg = SlideEncoderConfig(**own)
        except ValueError as e:
            raise ModelError(f"{spec_file}: slide_encoder: {e}") from None
        with torch.device("meta"):
            expected = SlideEncoder(cfg).state_dict()
        check_fits(expected, read_shapes(path, "slide encoder"), path, "slide encoder")
        return cfg
    return gigapath_config(path, n_tokens=576, pad_to=lang.projector_in, head=None)


class PartSources(TypedDict, total=False):
    """The parts a model is made of, as :func:`assemble_spec` and ``registry.add_model`` take them."""

    llava: Required[str | Path]
    tile_encoder: Required[str | Path]
    llava_base: str | Path | None
    slide_encoder: str | Path | None
    tile_encoder_args: dict[str, Any] | None
    template: str | None


def assemble_spec(
    name: str,
    *,
    llava: str | Path,
    tile_encoder: str | Path,
    llava_base: str | Path | None = None,
    slide_encoder: str | Path | None = None,
    tile_encoder_args: dict[str, Any] | None = None,
    template: str | None = None,
    tiling: TilingSpec | None = None,
) -> tuple[ModelSpec, ModelReport]:
    """The ``ModelSpec`` of a model made of these parts, after checking each part and every width."""
    from wsi_llava.features.timm_hub import inspect_folder

    llava_src = canonical_source(llava, "--llava")
    base_src = canonical_source(llava_base, "--llava-base") if llava_base else None
    te_src = canonical_source(tile_encoder, "--tile-encoder")
    lang = inspect_language(llava_src, base_src)
    if slide_encoder:
        se_src = canonical_source(slide_encoder, "--slide-encoder")
    elif lang.slide_encoder is not None:  # a checkpoint of ours keeps its own stage-1 slide encoder
        se_src = join_source(llava_src, OWN_SLIDE_ENCODER)
    else:
        se_src = join_source(te_src, SLIDE_ENCODER_FILE)
    report = ModelReport(name=name)

    te_path = resolve_source(te_src, "tile encoder")
    tile = inspect_folder(te_path, tile_encoder_args)
    prep = tile.preprocessing
    report.add(
        "tile encoder",
        te_src,
        te_path,
        f"{tile.architecture}, {tile.n_params:,} parameters, {tile.embed_dim}-d, "
        f"{prep.input_size} px (resize {prep.resize_size}, {prep.interpolation})",
    )
    try:
        se_path = resolve_source(se_src, "slide encoder")
    except ModelError as e:
        if slide_encoder:
            raise
        raise ModelError(f"{e}; pass --slide-encoder FILE (Prov-GigaPath's slide_encoder.pth)") from None
    se_cfg = _slide_encoder_config(se_path, lang)
    report.add(
        "slide encoder",
        se_src,
        se_path,
        f"LongNet {se_cfg.depth} layers x {se_cfg.embed_dim}, input {se_cfg.in_dim}-d, "
        f"{se_cfg.n_tokens} tokens, zero-padded to {se_cfg.out_dim}",
    )
    report.add("LLaVA", llava_src, resolve_source(llava_src, "LLaVA"), lang.summary)
    if base_src:
        report.add("LLaVA base", base_src, resolve_source(base_src), "base LLM")
    problems = []
    if tile.embed_dim != se_cfg.in_dim:
        problems.append(
            f"the tile encoder gives {tile.embed_dim}-d features but the slide encoder takes {se_cfg.in_dim}-d"
        )
    if se_cfg.embed_dim > lang.projector_in:
        problems.append(
            f"the slide encoder's {se_cfg.embed_dim}-d tokens do not fit the projector's {lang.projector_in}-d input"
        )
    if lang.projector_out != lang.hidden:
        problems.append(
            f"the projector gives {lang.projector_out}-d embeddings but the LLM is {lang.hidden}-d"
        )
    if problems:
        raise ModelError(f"model {name!r}: parts do not fit: " + "; ".join(problems))
    report.widths = [
        f"tile encoder {tile.embed_dim}-d = slide encoder input {se_cfg.in_dim}-d",
        f"slide encoder {se_cfg.embed_dim}-d tokens + {lang.projector_in - se_cfg.embed_dim} zeros = "
        f"projector input {lang.projector_in}-d",
        f"projector output {lang.projector_out}-d = LLM hidden size {lang.hidden}",
    ]
    spec = ModelSpec(
        name=name,
        tile_encoder=TileEncoderSpec(
            name=tile.architecture,
            source=te_src,
            timm_kwargs=tile_encoder_args or {},
            embed_dim=tile.embed_dim,
        ),
        tiling=tiling or TilingSpec(),
        slide_encoder=se_cfg.model_dump(mode="json"),
        slide_encoder_weights=se_src,
        projector=ProjectorSpec(
            type=lang.projector_type,  # type: ignore[arg-type]
            in_dim=lang.projector_in,
            out_dim=lang.projector_out,
        ),
        llm=LLMSpec(source=llava_src, format=lang.format, base=base_src),  # type: ignore[arg-type]
        template=template or lang.template,  # type: ignore[arg-type]
        generation=lang.generation,
        n_visual_tokens=se_cfg.n_tokens,
    )
    return spec, report


def check_spec(spec: ModelSpec) -> ModelReport:
    """Check a registered model again: every source still resolves and still holds what was recorded."""
    if spec.tile_encoder.source is None or spec.slide_encoder_weights is None or spec.llm.format == "hf":
        raise ModelError(f"model {spec.name!r}: not a model made of registered parts")
    fresh, report = assemble_spec(
        spec.name,
        llava=spec.llm.source,
        llava_base=spec.llm.base,
        tile_encoder=spec.tile_encoder.source,
        slide_encoder=spec.slide_encoder_weights,
        tile_encoder_args=spec.tile_encoder.timm_kwargs,
        template=spec.template,
        tiling=spec.tiling,
    )
    changed = [
        f"{what}: recorded {a}, now {b}"
        for what, a, b in (
            ("tile encoder width", spec.tile_encoder.embed_dim, fresh.tile_encoder.embed_dim),
            ("slide encoder", spec.slide_encoder, fresh.slide_encoder),
            ("projector", spec.projector, fresh.projector),
        )
        if a != b
    ]
    if changed:
        raise ModelError(
            f"model {spec.name!r}: its sources changed since it was added ({'; '.join(changed)}); "
            f"add it again with `wsi-llava models add {spec.name} ... --overwrite`"
        )
    return report
