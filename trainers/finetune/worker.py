"""The pieces of one fine-tuning worker that outlive a step, as small objects with named fields:

    embed = PromptEmbeddings(family)               # prompt -> the family's conditioning, encoded once
    fixed = FixedBatch.draw(...)                   # the worker's first batch with fixed noise: a steady loss
    window = LossWindow(device); window.add(...)   # per-sample losses summed on the device
    totals = window.reduce()                       # -> LossTotals (all workers), named sums
    checkpoints = Checkpoints(...); state = checkpoints.resume(); checkpoints.save(state, metrics)

`trainers.finetune.train.train_loop_per_worker` reads top to bottom with them.
"""

from __future__ import annotations

import json
import math
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from factory.errors import UserError
from trainers.devices import all_reduce

EMA_FILE = "ema_unet.safetensors"
STATE_FILE = "state.json"
DS_TAG = "deepspeed"


def masked_mse(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, normalize: bool = False
) -> torch.Tensor:
    """The paper's loss: mean over all elements of (mask * (pred - target))^2, the (B, h, w) mask repeated
    over channels. normalize=True divides each sample's sum by its mask area instead (an option, not the
    paper)."""
    m = mask[:, None].to(pred.dtype).expand_as(pred)
    se = (pred - target).pow(2) * m
    if not normalize:
        return se.mean()
    return (se.flatten(1).sum(1) / m.flatten(1).sum(1).clamp(min=1.0)).mean()


class PromptEmbeddings:
    """Prompt -> the frozen text encoders' conditioning as the model's family encodes it (SD: CLIP's
    tokens; SDXL: both CLIPs' tokens and the pooled embedding), each distinct prompt encoded once (a run
    has a few)."""

    def __init__(self, family):
        self.family = family
        self.cache: dict = {}

    def __call__(self, prompts):
        from factory.method.families import Conditioning

        for p in set(prompts) - self.cache.keys():
            self.cache[p] = self.family.encode([p])
        return Conditioning.cat([self.cache[p] for p in prompts])


def add_lora(module, lora) -> None:
    """LoRA adapters (peft, `lora`: a `config.LoraConfig`) on `module`'s target projections, its own
    parameters trainable, the base's not: diffusers' `add_adapter`. Gaussian-initialised A, zero B: the
    model is unchanged at step 0."""
    from peft import LoraConfig as PeftLoraConfig

    module.add_adapter(
        PeftLoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha or lora.rank,
            target_modules=list(lora.targets),
            init_lora_weights="gaussian",
        )
    )


class EngineCall:
    """The DeepSpeed engine with its module's face, for the family's denoiser (`families.Denoiser`): called,
    it is the engine (whose forward runs the module, gathering ZeRO-3's partitions); read, it is the module
    (its config, dtype, device)."""

    def __init__(self, engine):
        self.engine = engine

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.engine.module, name)


def encode_latents(vae, x: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, S, S) in [-1, 1] -> latents sampled from the frozen VAE's posterior, scaled as the
    method scales them (`factory.method.latents.encode_images`); the noise drawn from torch's generator,
    which the worker seeds and its checkpoints keep."""
    from factory.method.latents import encode_images

    seeds = torch.randint(0, 2**62, (x.shape[0],)).tolist()
    return encode_images(vae, x, [torch.Generator().manual_seed(s) for s in seeds])


@dataclass
class FixedBatch:
    """This worker's first batch with fixed noise and timesteps (`repeats` draws of each sample): its loss,
    logged beside the training loss, moves only with the weights."""

    z_t: torch.Tensor
    t: torch.Tensor
    emb: object  # the batch's `Conditioning`
    mask: torch.Tensor
    target: torch.Tensor

    @classmethod
    def draw(cls, objective, z0, emb, mask, seed: int, repeats: int = 4) -> FixedBatch:
        """`objective`: what the model learns (`trainers.finetune.objectives`)."""
        g = torch.Generator().manual_seed(seed)
        n = z0.shape[0] * repeats
        t = objective.sample_t(n, z0.device, generator=g)
        noise = torch.randn((n, *z0.shape[1:]), generator=g).to(z0.device)
        z0 = z0.repeat(repeats, 1, 1, 1)
        return cls(
            z_t=objective.noisy(z0, noise, t),
            t=t,
            emb=type(emb).cat([emb] * repeats),
            mask=mask.repeat(repeats, 1, 1),
            target=objective.target(z0, noise, t),
        )

    @torch.no_grad()
    def loss(self, denoiser, dtype: torch.dtype, normalize: bool) -> float:
        """The masked loss of `denoiser` (the family's call around the trained module) on this batch."""
        pred = denoiser(self.z_t.to(dtype), self.t, self.emb.to(dtype)).float()
        return float(masked_mse(pred, self.target, self.mask, normalize))


@dataclass
class LossTotals:
    """A log window's sums over all workers: the loss and samples of both tasks, and of each."""

    loss: float
    samples: float
    loss_full: float
    samples_full: float
    loss_background: float
    samples_background: float

    def metrics(self) -> dict[str, float]:
        """Mean losses: overall, the full-image task's and the background task's (NaN for a task not seen)."""

        def mean(total: float, n: float) -> float:
            return total / n if n else math.nan

        return {
            "loss": self.loss / max(self.samples, 1),
            "loss_full": mean(self.loss_full, self.samples_full),
            "loss_background": mean(self.loss_background, self.samples_background),
        }


class LossWindow:
    """The per-sample losses since the last log step, summed on the worker's device: no host sync per step,
    and what the log step all-reduces is on the device, as NCCL needs (`trainers.devices.all_reduce`). The
    sums are `LossTotals`' fields, in its order."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums = torch.zeros(len(fields(LossTotals)), dtype=torch.float64, device=device)

    def add(self, per_sample: torch.Tensor, tasks) -> None:
        """per_sample: (B,) losses on the device; tasks: the batch's "full" / "background" labels."""
        per = per_sample.double()
        full = torch.from_numpy(np.asarray(tasks) == "full").to(self.device)
        n = torch.full_like(per[0], len(per))
        n_full = full.sum().double()
        sums = {
            "loss": per.sum(),
            "samples": n,
            "loss_full": (per * full).sum(),
            "samples_full": n_full,
            "loss_background": (per * ~full).sum(),
            "samples_background": n - n_full,
        }
        self.sums += torch.stack([sums[f.name] for f in fields(LossTotals)])

    def reduce(self) -> LossTotals:
        """The window's sums over all workers, and a new window."""
        totals = all_reduce(self.sums.clone(), self.device).cpu().tolist()
        self.sums.zero_()
        return LossTotals(*totals)


@contextmanager
def full_parameters(params: list, stage: int):
    """With ZeRO-3 the parameters are partitioned: gather `params` (a collective: every rank must enter).
    The EMA gathers only what it keeps: the trained parameters (LoRA: the adapters, not the frozen base)."""
    if stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


def resumes_whole(saved: dict, world: int, stage: int) -> bool:
    """Whether a checkpoint (its `state.json`) resumes with its optimizer partitions: written by as many
    workers at the same ZeRO stage. (Checkpoints from before the stage was recorded were ZeRO-2's.)"""
    return saved.get("world_size") == world and saved.get("zero_stage", 2) == stage


class ResumeError(UserError, ValueError):
    """A run's checkpoint cannot resume with this job's workers or ZeRO stage."""


def check_resume(saved: dict, world: int, stage: int) -> None:
    """A checkpoint that cannot resume at this world size or ZeRO stage raises, before Ray starts: ZeRO-3
    partitions the weights themselves, so neither side of a change may be ZeRO-3 (DeepSpeed#2898)."""
    if resumes_whole(saved, world, stage):
        return
    was = (saved.get("world_size"), saved.get("zero_stage", 2))
    if 3 in (was[1], stage):
        raise ResumeError(
            f"this run's latest checkpoint was written by {was[0]} workers at ZeRO stage {was[1]}; under "
            f"ZeRO-3 it resumes only as it was written (here: {world} workers, stage {stage}). Run it with "
            f"scaling.workers={was[0]} and deepspeed.stage={was[1]}, or start a new run (another "
            "output.name) from its export (--export-only, then model=THE_EXPORT)."
        )


@dataclass
class TrainingState:
    """Where a run stands: what `state.json` records beside the DeepSpeed shards and the EMA."""

    step: int = 0
    samples_seen: int = 0
    resumed_from: int | None = None


class Checkpoints:
    """This worker's checkpoints: every rank writes its DeepSpeed shards and RNG state; rank 0 adds the EMA
    weights, `state.json` and a sample grid of the EMA denoiser; each reports its folder to Ray Train, which
    merges them into one checkpoint. `resume` reads Ray Train's latest one back, if any."""

    def __init__(
        self, cfg, engine, ema, names: list[str], rank: int, world: int, stage: int, family, validation: list
    ):
        self.cfg, self.engine, self.ema, self.names = cfg, engine, ema, names
        self.rank, self.world, self.stage = rank, world, stage
        self.family, self.validation = family, validation
        self.eval_module = None  # rank 0's denoiser for the sample grids, built at the first checkpoint

    def resume(self) -> TrainingState:
        import ray.train
        from safetensors.torch import load_file

        checkpoint = ray.train.get_checkpoint()
        if not checkpoint:
            return TrainingState()
        with checkpoint.as_directory() as d:
            saved = json.loads((Path(d) / STATE_FILE).read_text())
            whole = resumes_whole(saved, self.world, self.stage)
            # the same workers and ZeRO stage: every partition back; else (ZeRO-1/2 only, `check_resume`) the
            # module's weights alone, which ZeRO-1/2 keep whole, and a fresh optimizer
            self.engine.load_checkpoint(
                d,
                tag=DS_TAG,
                load_optimizer_states=whole,
                load_lr_scheduler_states=False,
                load_module_only=not whole,
            )
            state = TrainingState(saved["step"], saved["samples_seen"], resumed_from=saved["step"])
            if self.ema is not None:
                shadow = load_file(str(Path(d) / EMA_FILE))
                self.ema.load_state_dict(
                    {"shadow": [shadow[n] for n in self.names], "updates": saved["ema_updates"]}
                )
            rng = Path(d) / f"rng_rank{self.rank}.pt"
            if rng.exists():
                torch.set_rng_state(torch.load(rng, weights_only=True))
        if self.rank == 0:
            print(
                f"[finetune] resumed from the checkpoint at step {state.step}"
                + (
                    ""
                    if whole
                    else f" (written by {saved.get('world_size')} workers at ZeRO stage "
                    f"{saved.get('zero_stage', 2)}: its weights, EMA and step; the optimizer's moments start "
                    "afresh)"
                ),
                flush=True,
            )
        return state

    def save(self, state: TrainingState, metrics: dict) -> None:
        import ray.train
        from safetensors.torch import save_file

        with tempfile.TemporaryDirectory() as d:
            self.engine.save_checkpoint(d, tag=DS_TAG)
            torch.save(torch.get_rng_state(), Path(d) / f"rng_rank{self.rank}.pt")
            if self.rank == 0:
                shadow = {n: s.contiguous() for n, s in zip(self.names, self.ema.shadow, strict=True)}
                save_file(shadow, str(Path(d) / EMA_FILE))
                record = {
                    **asdict(state),
                    "ema_updates": self.ema.updates,
                    "world_size": self.world,
                    "zero_stage": self.stage,
                    "metrics": metrics,
                    "model": self.cfg.model,
                    "lora": self.cfg.lora.model_dump() if self.cfg.lora is not None else None,
                }
                (Path(d) / STATE_FILE).write_text(json.dumps(record, indent=1))
                if self.validation:
                    self.sample_grid().save(Path(d) / "samples.png")
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    def sample_grid(self):
        """The validation images through the EMA denoiser (`sample_grid`)."""
        if self.eval_module is None:  # built whole, as the module is not under ZeRO-3 (partitioned)
            module = self.engine.module
            if self.cfg.lora is not None:  # the base as it is on disk (frozen), with the adapters
                self.eval_module = type(module).from_pretrained(
                    self.cfg.model, subfolder=self.family.denoiser_name
                )
                self.eval_module.requires_grad_(False)
                add_lora(self.eval_module, self.cfg.lora)
            else:  # every parameter is the EMA's
                self.eval_module = type(module).from_config(module.config)
            self.eval_module.to(module.device).eval()
        self.ema.copy_to([p for p in self.eval_module.parameters() if p.requires_grad])
        cfg = self.cfg
        return sample_grid(
            self.family,
            self.eval_module,
            cfg.model,
            self.validation,
            cfg.data.background_prompt,
            cfg.checkpoint.grid_steps,
        )


def validation_images(urls: list[str], n: int) -> list[tuple[np.ndarray, str, dict]]:
    """The first n samples of the first shards: (image, concept, metadata), for the sample grids."""
    from factory.dataset.shards import read_tar, sample_image

    out = []
    for url in urls:
        for s in read_tar(url, limit=n - len(out)):
            meta = json.loads(s["json"])
            out.append((sample_image(s), meta["concept"], meta))
        if len(out) >= n:
            break
    return out


def sample_grid(family, module, model: str, validation, background_prompt: str, steps: int):
    """Rows: a validation image, m's M_pre, the inpainted background, refined M (all with the EMA
    denoiser `module`), then text-to-image samples of "a photo of a {concept}" and of the background prompt,
    through the model's own pipeline class with `module` in place of its denoiser."""
    from diffusers import DDIMScheduler

    from factory.dataset.report import contact_sheet
    from factory.method.distiller import Distiller
    from factory.method.schedulers import is_flow
    from factory.method.settings import Concept, DistillConfig

    pipe = family.pipe
    sampler = type(pipe.scheduler) if is_flow(pipe.scheduler) else DDIMScheduler  # DDIM: the paper's
    ema_pipe = type(pipe)(
        **{
            **pipe.components,
            family.denoiser_name: module,
            "scheduler": sampler.from_config(pipe.scheduler.config),
            # (SD's pipelines ask for a safety checker; the base model was loaded without one)
            **({"requires_safety_checker": False} if "requires_safety_checker" in pipe.config else {}),
        }
    )
    ema_pipe.set_progress_bar_config(disable=True)
    d = Distiller(
        model,
        pipeline=ema_pipe,
        config=DistillConfig(
            num_inference_steps=steps,
            probe_t0=max(1, steps * 4 // 5),
            inpaint_steps=steps,
            background_prompt=background_prompt,
        ),
    )
    rows, labels = [], []
    for i, (image, concept, meta) in enumerate(validation):
        c = Concept(
            concept, meta.get("template") or "a photo of a {concept}", tuple(meta.get("concept_words") or ())
        )
        [t] = d.label([image], c, seeds=[i])
        gens = [torch.Generator().manual_seed(1000 + i) for _ in range(2)]
        with torch.no_grad():
            samples = ema_pipe(  # at the method's canvas (the pipelines' own default may be another)
                prompt=[meta["prompt"], background_prompt],
                height=d.resolution,
                width=d.resolution,
                num_inference_steps=steps,
                guidance_scale=1.0,
                generator=gens,
                output_type="np",
            ).images
        rows.append(
            [
                t.image,
                t.prelim,
                t.background,
                t.mask,
                (samples[0] * 255).round().astype(np.uint8),
                (samples[1] * 255).round().astype(np.uint8),
            ]
        )
        labels.append(f"{concept} #{i}")
    return contact_sheet(
        rows,
        ["image", "M_pre (m')", "background (m')", "refined M", "sample: object", "sample: background"],
        row_labels=labels,
    )
