"""One student's training loop on every worker of its Ray Train run: batches, loss, Adam, validation and
checkpoints (one step is described in `trainers.students.train`)."""

from __future__ import annotations

import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from trainers.devices import autocast
from trainers.students.config import StudentsConfig
from trainers.students.model import build_student, predict_masks, student_loss, unwrap


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


def is_validation_row(key: str, every: int) -> bool:
    return zlib.crc32(key.encode()) % every == 0


class EMATeacher:
    """The student's exponential moving average (`train.teacher_decay` per step), whose probabilities
    take `train.teacher` of the target from `train.teacher_start` on: the labels' errors that the student
    has not memorised yet are corrected by what it predicts on average (a mean teacher; cf. bootstrapping,
    Reed et al. 2015)."""

    def __init__(self, student: torch.nn.Module, decay: float):
        import copy

        self.model = copy.deepcopy(student).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, student: torch.nn.Module) -> None:
        for t, s in zip(self.model.parameters(), student.parameters(), strict=True):
            t.lerp_(s.detach(), 1 - self.decay)
        for t, s in zip(self.model.buffers(), student.buffers(), strict=True):
            t.copy_(s)  # batch-norm statistics: the student's

    @torch.no_grad()
    def blend(self, x: torch.Tensor, target: torch.Tensor, share: float) -> torch.Tensor:
        """(1 - share) * target + share * the teacher's foreground probability on x."""
        return torch.lerp(target, torch.sigmoid(self.model(x)[:, 0].float()), share)


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
    teacher = EMATeacher(unwrap(model), cfg.train.teacher_decay) if cfg.train.teacher else None
    teacher_from = int(cfg.train.teacher_start * cfg.train.steps)
    step, best, history = 0, None, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / "state.pt", map_location=device, weights_only=True)
            unwrap(model).load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            step, best, history = state["step"], state["best"], state["history"]
            if teacher is not None:
                teacher.model.load_state_dict(state["teacher"])
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
            target = batch["target"]
            if teacher is not None and step >= teacher_from:
                with autocast(device, cfg.train.precision):
                    target = teacher.blend(x, target, cfg.train.teacher)
            with autocast(device, cfg.train.precision):
                logits = model(x)
            loss = student_loss(logits.float(), target, cfg.train.loss, multiclass, cfg.train.ignore_band)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if teacher is not None:
                teacher.update(unwrap(model))
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
                                **({"teacher": teacher.model.state_dict()} if teacher is not None else {}),
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
