"""The fine-tuning job's YAML (`configs/finetune-*.yaml`), validated with pydantic before any work, and the
DeepSpeed config built from it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from factory.method.settings import BACKGROUND_PROMPT
from factory.yaml_config import StrictConfig, load_yaml_config
from trainers.devices import check_gpu_share


class DataConfig(StrictConfig):
    shards: list[str] = Field(
        min_length=1, description="`factory label` outputs: folders, globs or list files"
    )
    concepts: list[str] = Field(default_factory=list, description="train only these concepts (default: all)")
    p_full: float = Field(0.5, ge=0.0, le=1.0, description="probability of the full-image task")
    background_prompt: str = BACKGROUND_PROMPT
    shuffle_buffer: int = Field(256, ge=0, description="rows in each worker's local shuffle buffer")
    map_num_cpus: float = Field(
        0.5, gt=0.0, description="CPU share of each Ray Data read / augmentation task"
    )


class TrainConfig(StrictConfig):
    max_steps: int = Field(2000, ge=1, description="optimizer steps")
    micro_batch: int = Field(4, ge=1, description="samples per worker per micro-step")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    ema_decay: float = Field(0.9999, ge=0.0, lt=1.0)
    normalize_loss: bool = False
    grad_clip: float | None = Field(None, gt=0.0)
    seed: int = 0
    gradient_checkpointing: Literal["auto", "on", "off"] = "auto"  # auto: on with GPUs
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"  # auto: bf16 with GPUs, fp32 on CPUs
    log_every: int = Field(10, ge=1)


class DeepSpeedConfig(StrictConfig):
    config: str = "configs/deepspeed/zero2.json"
    stage: Literal[1, 2, 3] | None = Field(None, description="overrides zero_optimization.stage")
    offload_optimizer: bool = Field(False, description="ZeRO-Offload of the optimizer state to the CPU")


class LoraConfig(StrictConfig):
    """LoRA adapters on the denoiser's attention projections (peft), trained in place of the whole
    denoiser; the export fuses them into a full diffusers folder and keeps the adapter beside it (`lora/`,
    `load_lora_adapter`'s format), or writes the adapter alone (`output.fused: false`): `inpaint.model` loads
    either."""

    rank: int = Field(16, ge=1, description="the adapters' rank r")
    alpha: float | None = Field(None, gt=0.0, description="their scale numerator (lora_alpha); default: rank")
    targets: list[str] = Field(
        default_factory=lambda: list(LORA_TARGETS),
        min_length=1,
        description="module names (peft target_modules): the attention projections by default, those "
        "the model has",
    )


# the attention projections of every family's blocks: UNet and DiT queries, keys, values and outputs, and the
# text stream's own in double-stream / joint blocks (diffusers' SD3 and FLUX LoRA scripts' attention targets)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


class CheckpointConfig(StrictConfig):
    every: int = Field(500, ge=1, description="steps between checkpoints (and sample grids)")
    keep: int = Field(2, ge=1)
    grid_images: int = Field(2, ge=0, description="validation images in each sample grid")
    grid_steps: int = Field(20, ge=1, description="DDIM steps of the sample grid")


class ScalingConfig(StrictConfig):
    workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    gpus_per_worker: float = Field(1.0, gt=0.0)
    max_failures: int = Field(2, ge=-1, description="worker-failure restarts from the latest checkpoint")

    @model_validator(mode="after")
    def _one_gpu_per_worker(self) -> ScalingConfig:
        check_gpu_share(self.workers, self.use_gpu, self.gpus_per_worker)
        return self


class OutputConfig(StrictConfig):
    storage: str = Field(
        "runs", description="Ray Train storage_path: a local folder (shared across nodes) or s3://, gs://"
    )
    name: str = Field("finetune", pattern=r"^[A-Za-z0-9_.-]+$")
    export: str | None = Field(None, description="diffusers pipeline directory of the EMA weights")
    fused: bool = Field(
        True,
        description="LoRA runs: export the adapters fused into a whole pipeline folder, beside lora/; false: "
        "lora/ and finetune.json alone (megabytes, not the base model's size), which a job's inpaint.model "
        "loads on top of its model",
    )


class FinetuneConfig(StrictConfig):
    """A `trainers finetune` job (`configs/finetune-*.yaml`): the base model, the label shards (`data`), the
    optimisation (`train`), ZeRO (`deepspeed`), checkpoints, workers (`scaling`) and the export (`output`).
    Unknown fields are errors; docs/finetune.md describes the recipe.

    Example:
        >>> cfg = FinetuneConfig.model_validate({"data": {"shards": ["out/label-star"]}})
        >>> cfg.train.lr, cfg.scaling.workers
        (0.0001, 2)
    """

    model: str = "toyworld"
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    lora: LoraConfig | None = Field(None, description="train LoRA adapters instead of the whole denoiser")
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @field_validator("model")
    @classmethod
    def _nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("model must name a short name, a diffusers directory or a hub id")
        return v

    @model_validator(mode="after")
    def _fused_is_for_lora(self) -> FinetuneConfig:
        if not self.output.fused and self.lora is None:
            raise ValueError(
                "output.fused: false exports LoRA adapters alone; set lora too, or leave it true"
            )
        return self

    def precision(self) -> str:
        mp = self.train.mixed_precision
        return ("bf16" if self.scaling.use_gpu else "no") if mp == "auto" else mp

    def checkpointing(self) -> bool:
        gc = self.train.gradient_checkpointing
        return self.scaling.use_gpu if gc == "auto" else gc == "on"


def load_finetune_config(path, overrides: list[str] | None = None) -> FinetuneConfig:
    """The fine-tuning YAML at `path` with `--set` overrides, validated (raises ConfigError, a UserError).

    Example:
        >>> cfg = load_finetune_config("configs/finetune-toyworld.yaml", ["data.shards=[out/label-star]"])
    """
    return load_yaml_config(path, overrides, FinetuneConfig)


def deepspeed_config(cfg: FinetuneConfig) -> dict:
    """The DeepSpeed JSON of `deepspeed.config`, completed from the training config."""
    path = Path(cfg.deepspeed.config)
    if not path.exists():
        raise FileNotFoundError(f"DeepSpeed config {path} not found (see configs/deepspeed/)")
    ds = json.loads(path.read_text())
    ds.pop("train_batch_size", None)
    ds["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch
    ds["gradient_accumulation_steps"] = cfg.train.grad_accum
    zero = ds.setdefault("zero_optimization", {})
    if cfg.deepspeed.stage is not None:
        zero["stage"] = cfg.deepspeed.stage
    if cfg.deepspeed.offload_optimizer:
        if zero.get("stage", 0) < 1:
            raise ValueError("optimizer offload needs ZeRO stage 1, 2 or 3")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.scaling.use_gpu}
    precision = cfg.precision()
    if precision != "no" and not cfg.scaling.use_gpu:
        raise ValueError(f"mixed precision {precision} needs GPUs (scaling.use_gpu: true); use 'no' on CPUs")
    ds["bf16"] = {"enabled": precision == "bf16"}
    ds["fp16"] = {"enabled": precision == "fp16"}
    if cfg.train.grad_clip:
        ds["gradient_clipping"] = cfg.train.grad_clip
    ds["zero_allow_untested_optimizer"] = True  # torch AdamW is a client optimizer
    ds.setdefault("steps_per_print", 10**9)
    return ds
