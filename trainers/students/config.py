"""The students job's YAML (`configs/students-*.yaml`), validated with pydantic before any work."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from factory.yaml_config import StrictConfig, load_yaml_config
from trainers.devices import check_gpu_share


class ModelConfig(StrictConfig):
    backbone: str = Field("resnet18", description="any timm model name (used as smp's tu-<name> encoder)")
    decoder: str = Field(
        "Unet", description="a segmentation_models_pytorch architecture: Unet, FPN, DeepLabV3Plus, ..."
    )
    pretrained: str | None = Field(None, description="a local timm checkpoint of the backbone; no hub access")
    resolution: int = Field(128, ge=32, description="training and evaluation crop (the paper: 128)")
    decoder_kwargs: dict = Field(
        default_factory=dict, description="passed to the smp architecture, e.g. decoder_channels"
    )


class DataConfig(StrictConfig):
    shards: list[str] = Field(min_length=1, description="D_s and/or D'_s: shard folders, globs or list files")
    target: str = Field("refined", pattern="^(refined|prelim|attention)$")
    concepts: list[str] = Field(
        default_factory=list, description="default: every concept named in the shards' jobs"
    )
    val_every: int = Field(20, ge=2, description="hold out 1 in N rows (by key hash) for validation")
    augment: str = Field(
        "paper",
        pattern="^(paper|colour)$",
        description="paper: random crop + horizontal flip; colour: also vertical flip, channel order, "
        "inversion, brightness/contrast (trainers.students.data.crop_and_augment)",
    )
    cache: bool = Field(
        True,
        description="each worker keeps its decoded, resized rows in memory for all epochs (4*S^2 B a row); "
        "false streams the shards through Ray Data every epoch",
    )
    map_num_cpus: float = Field(0.25, gt=0.0)


class TrainConfig(StrictConfig):
    steps: int = Field(12000, ge=1, description="fixed step budget (the paper: ~12000 at batch 32)")
    batch: int = Field(32, ge=1)
    lr: float = Field(2e-3, gt=0.0)
    loss: str = Field("bce", pattern="^(bce|bce\\+dice)$")
    ignore_band: int = Field(
        0,
        ge=0,
        description="learning from noisy labels: pixels within this many (at model.resolution) of a label's "
        "boundary, on either side, count for nothing in the loss (0: off; docs/students.md)",
    )
    teacher: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="learning from noisy labels: from train.teacher_start on, the target is "
        "(1 - teacher) * label + teacher * an EMA teacher's probability (0: off; binary students)",
    )
    teacher_decay: float = Field(0.99, gt=0.0, lt=1.0, description="the EMA teacher's decay per step")
    teacher_start: float = Field(
        0.5, ge=0.0, le=1.0, description="the fraction of train.steps after which the teacher's share counts"
    )
    seed: int = 0
    seeds: list[int] = Field(
        default_factory=list,
        description="several students per concept, one per seed, trained in the same run (a grid over "
        "concepts and seeds); seed s exports to {export}/seed{s}/{concept}. Empty: `seed` alone",
    )
    log_every: int = Field(50, ge=1)
    channels_last: bool = Field(
        True,
        description="speed only: the student and its batches in channels_last memory format (on 2 CPU "
        "cores about 1.2x the steps/s of the default layout at 64 px; docs/students.md)",
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description="auto: bf16 autocast on a GPU, fp32 on the CPU (trainers.devices.autocast)",
    )


class CheckpointConfig(StrictConfig):
    every: int = Field(1000, ge=1)
    keep: int = Field(2, ge=1)


class ScalingConfig(StrictConfig):
    workers: int = Field(1, ge=1, description="DDP workers per student")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    gpus_per_worker: float = Field(1.0, gt=0.0)
    max_concurrent: int | None = Field(None, ge=1, description="students trained at once (default: all)")
    max_failures: int = Field(1, ge=-1)

    @model_validator(mode="after")
    def _one_gpu_per_worker(self) -> ScalingConfig:
        # a Tune trial of one worker may share a GPU (fractional gpus_per_worker); DDP workers may not
        check_gpu_share(self.workers, self.use_gpu, self.gpus_per_worker)
        return self


class OutputConfig(StrictConfig):
    storage: str = "runs"
    name: str = Field("students", pattern=r"^[A-Za-z0-9_.-]+$")
    export: str = Field(
        "out/students", description="one folder per student: best.pt, last.pt, *.ts, student.json"
    )


class StudentsConfig(StrictConfig):
    """A `trainers students` job (`configs/students-*.yaml`): the timm backbone and decoder (`model`), the
    shards and targets (`data`), the recipe (`train`), checkpoints, workers and the export. docs/students.md
    describes it.

    Example:
        >>> cfg = StudentsConfig.model_validate({"data": {"shards": ["out/toyworld"]}})
    """

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    multiclass: bool = False

    @model_validator(mode="after")
    def _check(self) -> StudentsConfig:
        if self.multiclass and self.data.target == "attention":
            raise ValueError("a multi-class student needs binary targets (refined or prelim), not attention")
        if self.multiclass and self.train.teacher:
            raise ValueError("train.teacher serves binary students; a multi-class student trains without it")
        return self


def load_students_config(path, overrides: list[str] | None = None) -> StudentsConfig:
    """The students YAML at `path` with `--set` overrides, validated (raises ConfigError, a UserError)."""
    return load_yaml_config(path, overrides, StudentsConfig)
