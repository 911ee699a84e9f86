"""Students (paper Step 6): timm-backbone segmenters trained on triplet shards, every concept at once.

    trainers students configs/students-toyworld.yaml [--set KEY=VALUE ...]

Per concept, one Ray Train run (a `TorchTrainer`, `scaling.workers` DDP workers) trains a binary student
on that concept's rows of the shards; Ray Tune runs the concepts' runs concurrently, one trial each
(`scaling.max_concurrent` at a time). `multiclass: true` trains one student (background + C concepts) on
the union instead. Students are `segmentation_models_pytorch` decoders on any timm backbone (`tu-<name>`).

One training step, top to bottom:
  (image, target) batch (`trainers.students.data`: refined masks by default, M_pre or soft attention as
  options; resize, random crop, flip) from the worker's share of the rows that the trial prepared once in
  Ray Data (`data.cache`, the default), or from its Ray Data shard, streamed every epoch
  -> logits = student(image)   (student and batch in channels_last, `train.channels_last`)
  -> loss = BCE(logits, target) [+ Dice]  (softmax cross-entropy for the multi-class student)
  -> Adam step (lr 2e-3, fixed step budget: the paper's "standardized" recipe)
Every `checkpoint.every` steps the student is scored on held-out rows (1 in `data.val_every` by key hash;
their targets are pseudo-labels too, as the paper validates on refined masks) and reported to Ray Train with
a checkpoint. The best (by validation IoU against the pseudo-labels) and last weights are exported as state
dicts plus TorchScript, with a `student.json` that `trainers evaluate` reads.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time
import zlib
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from factory.dataset.console import init_ray
from factory.dataset.shards import decode_sample
from factory.dataset.sources import storage_path
from trainers.devices import autocast, check_gpu_share


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StudentModel(_Strict):
    backbone: str = Field("resnet18", description="any timm model name (used as smp's tu-<name> encoder)")
    decoder: str = Field(
        "Unet", description="a segmentation_models_pytorch architecture: Unet, FPN, DeepLabV3Plus, ..."
    )
    pretrained: str | None = Field(None, description="a local timm checkpoint of the backbone; no hub access")
    resolution: int = Field(128, ge=32, description="training and evaluation crop (the paper: 128)")
    decoder_kwargs: dict = Field(
        default_factory=dict, description="passed to the smp architecture, e.g. decoder_channels"
    )


class StudentData(_Strict):
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


class StudentTrain(_Strict):
    steps: int = Field(12000, ge=1, description="fixed step budget (the paper: ~12000 at batch 32)")
    batch: int = Field(32, ge=1)
    lr: float = Field(2e-3, gt=0.0)
    loss: str = Field("bce", pattern="^(bce|bce\\+dice)$")
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


class StudentCheckpoint(_Strict):
    every: int = Field(1000, ge=1)
    keep: int = Field(2, ge=1)


class StudentScaling(_Strict):
    workers: int = Field(1, ge=1, description="DDP workers per student")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    gpus_per_worker: float = Field(1.0, gt=0.0)
    max_concurrent: int | None = Field(None, ge=1, description="students trained at once (default: all)")
    max_failures: int = Field(1, ge=-1)

    @model_validator(mode="after")
    def _one_gpu_per_worker(self) -> StudentScaling:
        # a Tune trial of one worker may share a GPU (fractional gpus_per_worker); DDP workers may not
        check_gpu_share(self.workers, self.use_gpu, self.gpus_per_worker)
        return self


class StudentOutput(_Strict):
    storage: str = "runs"
    name: str = Field("students", pattern=r"^[A-Za-z0-9_.-]+$")
    export: str = Field(
        "out/students", description="one folder per student: best.pt, last.pt, *.ts, student.json"
    )


class StudentsConfig(_Strict):
    """A `trainers students` job (`configs/students-*.yaml`): the timm backbone and decoder (`model`), the
    shards and targets (`data`), the recipe (`train`), checkpoints, workers and the export. docs/students.md
    describes it.

    Example:
        >>> cfg = StudentsConfig.model_validate({"data": {"shards": ["out/toyworld"]}})
    """

    model: StudentModel = Field(default_factory=StudentModel)
    data: StudentData
    train: StudentTrain = Field(default_factory=StudentTrain)
    checkpoint: StudentCheckpoint = Field(default_factory=StudentCheckpoint)
    scaling: StudentScaling = Field(default_factory=StudentScaling)
    output: StudentOutput = Field(default_factory=StudentOutput)
    multiclass: bool = False

    @model_validator(mode="after")
    def _check(self) -> StudentsConfig:
        if self.multiclass and self.data.target == "attention":
            raise ValueError("a multi-class student needs binary targets (refined or prelim), not attention")
        return self


def load_students_config(path, overrides: list[str] | None = None) -> StudentsConfig:
    """The students YAML at `path` with `--set` overrides, validated (raises ConfigError, a UserError)."""
    from factory.dataset.config import load_yaml_model

    return load_yaml_model(path, overrides, StudentsConfig)


# ----------------------------------------------------------------------------- the model


class PretrainedWeightsError(RuntimeError):
    """Backbone weights were asked for but are not available offline."""


def build_student(
    backbone: str,
    classes: int = 1,
    decoder: str = "Unet",
    pretrained: str | None = None,
    decoder_kwargs: dict | None = None,
):
    """A segmentation_models_pytorch `decoder` on the timm `backbone` (smp's `tu-<name>` universal encoder).

    `pretrained` is a local file (a timm checkpoint of the backbone: .safetensors, .pth, .bin); weights are
    never downloaded."""
    import segmentation_models_pytorch as smp
    import timm

    if not timm.is_model(backbone):
        close = timm.list_models(f"*{backbone.split('_')[0]}*")[:8]
        raise ValueError(
            f"unknown timm backbone {backbone!r}" + (f"; similar names: {', '.join(close)}" if close else "")
        )
    arch = getattr(smp, decoder, None)
    if arch is None or not isinstance(arch, type):
        raise ValueError(
            f"unknown segmentation_models_pytorch architecture {decoder!r} (e.g. Unet, FPN, DeepLabV3Plus)"
        )
    model = arch(
        encoder_name=f"tu-{backbone}", encoder_weights=None, classes=classes, **(decoder_kwargs or {})
    )
    if pretrained:
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise PretrainedWeightsError(
                f"pretrained backbone weights {str(path)!r} not found. Weights are never downloaded here: "
                f"download the timm checkpoint of {backbone!r} where the hub is reachable and give its local "
                "path, or set "
                "model.pretrained: null to train from scratch."
            )
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
        encoder = model.encoder.model
        own = encoder.state_dict()
        matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        if len(matched) < 0.5 * len(own):
            raise PretrainedWeightsError(
                f"{path} matches only {len(matched)} of {len(own)} tensors of the "
                f"{backbone!r} encoder: is it a checkpoint of that backbone?"
            )
        encoder.load_state_dict(matched, strict=False)
    return model


def student_loss(logits: torch.Tensor, target: torch.Tensor, kind: str = "bce", multiclass: bool = False):
    if multiclass:
        return F.cross_entropy(logits, target.long())
    logits = logits[:, 0]
    loss = F.binary_cross_entropy_with_logits(logits, target)
    if kind == "bce+dice":
        p = torch.sigmoid(logits)
        inter = (p * target).flatten(1).sum(1)
        dice = 1 - (2 * inter + 1) / (p.flatten(1).sum(1) + target.flatten(1).sum(1) + 1)
        loss = loss + dice.mean()
    return loss


def predict_masks(model, images: torch.Tensor, multiclass: bool = False) -> torch.Tensor:
    """(B, 3, S, S) in [-1, 1] -> (B, S, S) foreground (binary: p >= 0.5; multi-class: argmax > 0)."""
    with torch.no_grad():
        logits = model(images)
    return logits.argmax(1) > 0 if multiclass else torch.sigmoid(logits[:, 0]) >= 0.5


# ----------------------------------------------------------------------------- one student's Ray Train run


def cached_batches(rows: dict, cfg: StudentsConfig, multiclass: bool, rng: np.random.Generator, device):
    """One epoch over a worker's cached prepared rows: a fresh permutation, fresh crops (`data.augment`)."""
    from trainers.students.data import to_student_examples

    order = rng.permutation(len(rows["label"]))
    b = cfg.train.batch
    for i in range(0, len(order) - b + 1, b):  # drop_last, as the streamed path
        pick = order[i : i + b]
        batch = to_student_examples(
            {"stack": [rows["stack"][j] for j in pick], "label": rows["label"][pick]},
            cfg.model.resolution,
            augment=cfg.data.augment,
            multiclass=multiclass,
            rng=rng,
        )
        yield {k: torch.from_numpy(v).to(device) for k, v in batch.items()}


def _is_val(key: str, every: int) -> bool:
    return zlib.crc32(key.encode()) % every == 0


class LossSum:
    """The training losses since the last report, summed on the device: `.item()` once per report, not a
    host sync every step."""

    def __init__(self, device: torch.device):
        self.total = torch.zeros((), device=device)
        self.n = 0

    def add(self, loss: torch.Tensor) -> None:
        self.total += loss.detach().float()
        self.n += 1

    def mean(self) -> float:
        return self.total.item() / max(self.n, 1)


def student_train_loop(config: dict) -> None:
    """Runs on every worker of one student's Ray Train run."""
    import ray.train
    import ray.train.torch

    cfg = StudentsConfig.model_validate(config["job"])
    classes, concept = config["classes"], config["concept"]
    multiclass = classes is not None
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)
    model = build_student(
        cfg.model.backbone,
        len(classes) + 1 if multiclass else 1,
        cfg.model.decoder,
        cfg.model.pretrained,
        cfg.model.decoder_kwargs,
    )
    layout = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = ray.train.torch.prepare_model(model.to(memory_format=layout))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    step, best, history = 0, None, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / "state.pt", map_location=device, weights_only=True)
            unwrap(model).load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            step, best, history = state["step"], state["best"], state["history"]
    val = config["val"]
    val_x = torch.from_numpy(val["image"]).to(device, memory_format=layout) if len(val["image"]) else None
    val_y = torch.from_numpy(val["target"]).to(device) if len(val["image"]) else None
    t0, window = time.time(), LossSum(device)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    start_time = time.time()
    if cfg.data.cache:  # this worker's share of the rows prepared once by the trial (`_dataset`)
        prepared = ray.get(config["rows"])
        rows = {"stack": prepared["stack"][rank::world], "label": prepared["label"][rank::world]}
        # augmentation draws depend on the seed, the rank and the resumed step only
        rng = np.random.default_rng([cfg.train.seed, rank, step])
    else:
        shard = ray.train.get_dataset_shard("train")
    while step < cfg.train.steps:
        seen = False
        epoch = (
            cached_batches(rows, cfg, multiclass, rng, device)
            if cfg.data.cache
            else shard.iter_torch_batches(batch_size=cfg.train.batch, drop_last=True, device=device)
        )
        for batch in epoch:
            seen = True
            model.train()
            x = batch["image"].contiguous(memory_format=layout)
            with autocast(device, cfg.train.precision):
                logits = model(x)
            loss = student_loss(logits.float(), batch["target"], cfg.train.loss, multiclass)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            window.add(loss)  # on the device: no host sync per step
            last = step >= cfg.train.steps
            if step % cfg.checkpoint.every == 0 or last:
                metrics = {
                    "step": step,
                    "loss": window.mean(),
                    "concept": concept or "multiclass",
                    "steps_per_s": window.n / (time.time() - t0),
                    "started_at": start_time,
                    "reported_at": time.time(),
                }
                if val_x is not None:
                    model.eval()
                    with autocast(device, cfg.train.precision):
                        pred = torch.cat(
                            [
                                predict_masks(model, val_x[i : i + 64], multiclass)
                                for i in range(0, len(val_x), 64)
                            ]
                        )
                    gt = val_y >= 0.5 if not multiclass else val_y > 0
                    inter, union = (pred & gt).sum().item(), (pred | gt).sum().item()
                    metrics["val_iou"] = inter / union if union else 1.0
                    metrics["val_acc"] = (pred == gt).float().mean().item()
                history.append(metrics)
                score = metrics.get("val_iou", -metrics["loss"])
                is_best = best is None or score > best
                best = score if is_best else best
                with tempfile.TemporaryDirectory() as d:
                    if rank == 0:
                        torch.save(
                            {
                                "model": unwrap(model).state_dict(),
                                "opt": opt.state_dict(),
                                "step": step,
                                "best": best,
                                "history": history,
                            },
                            Path(d) / "state.pt",
                        )
                        torch.save(unwrap(model).state_dict(), Path(d) / "last.pt")
                        if is_best:
                            torch.save(unwrap(model).state_dict(), Path(d) / "best.pt")
                        print(
                            f"[students] {concept or 'multiclass'} step {step}/{cfg.train.steps} loss "
                            f"{metrics['loss']:.4f} val IoU {metrics.get('val_iou', float('nan')):.3f} "
                            f"{metrics['steps_per_s']:.2f} steps/s",
                            flush=True,
                        )
                    ray.train.report(
                        metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None
                    )
                window, t0 = LossSum(device), time.time()
            if last:
                break
        if not seen:
            raise RuntimeError(
                f"no training rows for {concept or 'the multi-class student'}: the shards hold fewer "
                f"than {cfg.train.batch} x {cfg.scaling.workers} rows of it (check data.shards and "
                "data.concepts)"
            )


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def _prepare_and_split(batch: dict, every: int, **kw) -> dict:
    """prepare_rows plus each row's validation flag (1 in `every` by key hash)."""
    from trainers.students.data import prepare_rows

    out = prepare_rows(batch, **kw)
    out["val"] = np.array([_is_val(k, every) for k in batch["__key__"]], bool)
    return out


def _dataset(cfg: StudentsConfig, urls: list[str], concepts: list[str] | None, classes: list[str] | None):
    """(the training rows or dataset, the validation arrays (centre crops)).

    Shard rows are decoded and resized in Ray Data (`prepare_rows`). With `data.cache` (the default) that is
    one execution here, whose prepared rows (4 * S^2 bytes a row) go to the workers as one object in Ray's
    object store, each worker drawing every epoch's crops of its share itself (`cached_batches`): an epoch
    of a small set is a few steps, and every Ray Data execution costs seconds of start-up (measured: the
    worker's own execution of a 140-row set made its first 250 steps take ~40 s longer). Returns
    ({"stack", "label"}, val). Without the cache every epoch streams the shards through Ray Data again (sets
    larger than memory), the crops drawn there: returns (the Ray Dataset, val)."""
    import ray

    from trainers.students.data import prepare_rows, row_meta, to_student_examples

    size, cpus, every = cfg.model.resolution, cfg.data.map_num_cpus, cfg.data.val_every
    ds = ray.data.read_webdataset(urls, shuffle="files", decoder=decode_sample, num_cpus=cpus)
    if concepts:  # rows of other concepts go before any decoding (and no batch comes out empty)
        keep = set(concepts)
        ds = ds.filter(lambda r: row_meta(r).get("concept") in keep, num_cpus=cpus)
    kw = {"size": size, "target": cfg.data.target, "classes": classes}
    multiclass = classes is not None
    if cfg.data.cache:
        rows = ds.map_batches(
            _prepare_and_split, batch_size=32, num_cpus=cpus, fn_kwargs={**kw, "every": every}
        ).take_all()
        train_rows = [r for r in rows if not r["val"]]
        val_rows = [r for r in rows if r["val"]]
        train = {
            "stack": [r["stack"] for r in train_rows],
            "label": np.array([r["label"] for r in train_rows], np.int64),
        }
    else:
        train = ds.filter(lambda r: not _is_val(r["__key__"], every), num_cpus=cpus)
        train = train.map_batches(prepare_rows, batch_size=32, num_cpus=cpus, fn_kwargs=kw)
        train = train.map_batches(
            to_student_examples,
            batch_size=32,
            num_cpus=cpus,
            fn_kwargs={"size": size, "multiclass": multiclass, "augment": cfg.data.augment},
        )
        val_rows = (
            ds.filter(lambda r: _is_val(r["__key__"], every), num_cpus=cpus)
            .map_batches(prepare_rows, batch_size=32, num_cpus=cpus, fn_kwargs=kw)
            .take_all()
        )
    # validation: centre crops, fixed once (a small set)
    val = to_student_examples(
        {"stack": [r["stack"] for r in val_rows], "label": np.array([r["label"] for r in val_rows])},
        size,
        augment=None,
        multiclass=multiclass,
    )
    return train, val


def train_one(job: dict, concept: str | None, classes: list[str] | None, urls: list[str]) -> dict:
    """One student's Ray Train run (a Ray Tune trial, or called directly). Returns its summary."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = StudentsConfig.model_validate(job)
    name = concept or "multiclass"
    ray.data.DataContext.get_current().enable_progress_bars = False
    train, val = _dataset(cfg, urls, [concept] if concept else None, classes)
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    started = time.time()
    trainer = TorchTrainer(
        student_train_loop,
        train_loop_config={
            "job": job,
            "concept": concept,
            "classes": classes,
            "val": val,
            # one copy in the object store, whatever the number of workers; each reads its share zero-copy
            "rows": ray.put(train) if cfg.data.cache else None,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.workers, use_gpu=cfg.scaling.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=f"{cfg.output.name}-{name}",
            storage_path=storage_path(cfg.output.storage),
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
        ),
        datasets=None if cfg.data.cache else {"train": train},
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    out = Path(cfg.output.export) / name
    export_student(cfg, result, out, concept, classes)
    return {
        "student": name,
        "seed": cfg.train.seed,
        "export": str(out),
        "started": started,
        "finished": time.time(),
        "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float, str))},
        "val_images": int(len(val["image"])),
    }


def export_student(
    cfg: StudentsConfig, result, out: Path, concept: str | None, classes: list[str] | None
) -> None:
    """best.pt / last.pt state dicts, best.ts / last.ts TorchScript, student.json (how to rebuild it)."""
    import warnings

    out.mkdir(parents=True, exist_ok=True)
    # the best checkpoint's best.pt is in the newest checkpoint that holds one
    best_dir = None
    for ckpt, _ in sorted(result.best_checkpoints, key=lambda cm: cm[1].get("step", 0)):
        with ckpt.as_directory() as d:
            if (Path(d) / "best.pt").exists():
                best_dir = ckpt
    with result.checkpoint.as_directory() as d:
        last = torch.load(Path(d) / "last.pt", map_location="cpu", weights_only=True)
        history = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)["history"]
    best = last
    if best_dir is not None:
        with best_dir.as_directory() as d:
            best = torch.load(Path(d) / "best.pt", map_location="cpu", weights_only=True)
    n_classes = len(classes) + 1 if classes else 1
    info = {
        "backbone": cfg.model.backbone,
        "decoder": cfg.model.decoder,
        "decoder_kwargs": cfg.model.decoder_kwargs,
        "resolution": cfg.model.resolution,
        "classes": n_classes,
        "concept": concept,
        "class_names": ["background", *classes] if classes else None,
        "target": cfg.data.target,
        "steps": cfg.train.steps,
        "history": history,
    }
    x = torch.zeros(1, 3, cfg.model.resolution, cfg.model.resolution)
    for tag, state in (("best", best), ("last", last)):
        torch.save(state, out / f"{tag}.pt")
        model = build_student(
            cfg.model.backbone, n_classes, cfg.model.decoder, decoder_kwargs=cfg.model.decoder_kwargs
        ).eval()
        model.load_state_dict(state)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.trace(model, x).save(str(out / f"{tag}.ts"))
    (out / "student.json").write_text(json.dumps(info, indent=1))


def load_student(path: str | Path, which: str = "best"):
    """A student exported by `trainers students`: (model in eval mode, its student.json)."""
    d = Path(path)
    info_file = d / "student.json"
    if not info_file.exists():
        raise FileNotFoundError(
            f"{d} is not an exported student (no student.json); point at one of "
            "`trainers students`' output folders"
        )
    info = json.loads(info_file.read_text())
    model = build_student(
        info["backbone"], info["classes"], info["decoder"], decoder_kwargs=info.get("decoder_kwargs")
    ).eval()
    model.load_state_dict(torch.load(d / f"{which}.pt", map_location="cpu", weights_only=True))
    return model, info


def discover_concepts(urls_by_source: dict[str, list[str]]) -> list[str]:
    """The concepts named in the job.json beside each source's shards (the jobs that wrote them)."""
    import fsspec

    found: list[str] = []
    for source in urls_by_source:
        job = source.rstrip("/") + "/job.json"
        try:
            with fsspec.open(job, "r") as f:
                names = [c["name"] for c in json.load(f)["config"]["concepts"]]
        except (FileNotFoundError, KeyError, json.JSONDecodeError):
            continue
        found += [n for n in names if n not in found]
    return found


def run_students(cfg: StudentsConfig, verbose: bool | None = None) -> dict:
    import ray
    from ray import tune

    from factory.dataset.sources import list_shards

    urls_by_source = {s: list_shards(s) for s in cfg.data.shards}
    urls = [u for us in urls_by_source.values() for u in us]
    concepts = cfg.data.concepts or discover_concepts(urls_by_source)
    if not concepts:
        raise ValueError("no concepts: list them in data.concepts (the shard folders carry no job.json)")
    init_ray(verbose)
    ray.data.DataContext.get_current().enable_progress_bars = False
    # Ray Tune runs each trial in a working directory of its own, so relative local paths would land there:
    # make them absolute here, in the driver (fsspec URLs stay as they are).
    cfg = cfg.model_copy(deep=True)
    cfg.output.storage = storage_path(cfg.output.storage)
    cfg.output.export = storage_path(cfg.output.export)
    if cfg.model.pretrained:
        cfg.model.pretrained = storage_path(cfg.model.pretrained)
    job = cfg.model_dump()
    seeds = cfg.train.seeds or [cfg.train.seed]

    def seed_job(seed: int) -> dict:
        """The job of one seed's students: with train.seeds, their own seed, run name and export folder."""
        if not cfg.train.seeds:
            return job
        j = copy.deepcopy(job)
        j["train"]["seed"] = seed
        j["output"]["name"] = f"{cfg.output.name}-seed{seed}"
        j["output"]["export"] = f"{cfg.output.export.rstrip('/')}/seed{seed}"
        return j

    t0 = time.time()
    also = f", seeds {', '.join(map(str, seeds))}" if cfg.train.seeds else ""
    if cfg.multiclass:
        print(
            f"[students] one multi-class student (background + {', '.join(concepts)}){also} on "
            f"{len(urls)} shards",
            flush=True,
        )
        results = [train_one(seed_job(s), None, concepts, urls) for s in seeds]
    else:
        n = len(concepts) * len(seeds)
        at_once = min(n, cfg.scaling.max_concurrent or n)
        print(
            f"[students] {n} students, {at_once} at once ({', '.join(concepts)}{also}), "
            f"backbone {cfg.model.backbone}, {cfg.train.steps} steps each, on {len(urls)} shards",
            flush=True,
        )

        def trial(config: dict) -> None:
            summary = train_one(seed_job(config["seed"]), config["concept"], None, urls)
            tune.report({"summary": json.dumps(summary)})

        # one Tune run for every (concept, seed): one start-up and teardown of Tune for all of them
        tuner = tune.Tuner(
            tune.with_resources(trial, {"CPU": 0.01}),  # the trial only drives its Ray Train run
            param_space={"concept": tune.grid_search(concepts), "seed": tune.grid_search(seeds)},
            tune_config=tune.TuneConfig(max_concurrent_trials=at_once),
            run_config=tune.RunConfig(
                name=f"{cfg.output.name}-tune", storage_path=storage_path(cfg.output.storage), verbose=0
            ),
        )
        grid = tuner.fit()
        errors = [r.error for r in grid if r.error]
        if errors:
            raise RuntimeError(f"{len(errors)} student run(s) failed; the first: {errors[0]}")
        results = [json.loads(r.metrics["summary"]) for r in grid]
    summary = {"students": results, "wall_s": time.time() - t0, "export": cfg.output.export}
    Path(cfg.output.export).mkdir(parents=True, exist_ok=True)
    (Path(cfg.output.export) / "students.json").write_text(json.dumps(summary, indent=1))
    for r in sorted(results, key=lambda r: r["started"]):
        m = r["metrics"]
        print(
            f"[students] {r['student']}"
            + (f" seed {r['seed']}" if cfg.train.seeds else "")
            + f": {r['started'] - t0:6.1f}s -> {r['finished'] - t0:6.1f}s, step "
            f"{m.get('step')}, loss {m.get('loss', float('nan')):.4f}, "
            f"val IoU {m.get('val_iou', float('nan')):.3f}"
            f" -> {r['export']}",
            flush=True,
        )
    return summary


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from factory.dataset.config import ConfigError

    p = argparse.ArgumentParser(
        prog="trainers students", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("config", help="students YAML (see configs/students-*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--verbose", action="store_true", help="show Ray's log lines")
    a = p.parse_args(argv)
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    try:
        cfg = load_students_config(a.config, a.set)
        build_student(
            cfg.model.backbone, 1, cfg.model.decoder, cfg.model.pretrained, cfg.model.decoder_kwargs
        )  # fail before Ray starts
    except (ConfigError, ValueError, PretrainedWeightsError) as err:
        print(f"trainers students: error: {err}", file=sys.stderr)
        return 2
    run_students(cfg, verbose=a.verbose or None)
    return 0
