"""Pretrain the toyworld foundation model from scratch on rendered data (CPU-friendly recipe).

Stage 1 trains the AutoencoderKL (64x64x3 <-> 16x16x4) with an MSE + small KL loss, then sets its
`scaling_factor` to 1/std of the latents (as Stable Diffusion's 0.18215 was chosen). Stage 2 encodes the
render pool once and trains the text encoder and the UNet jointly with epsilon prediction on the SD v1
noise schedule, ~10% caption dropout and an EMA copy. Captions randomly drop the colour and background
phrases, so that the shape word is what tells shapes apart and "a photo of a {concept}" is in
distribution. Every `eval_every` steps the paper's attention probe is run on held-out renders and its
pixel AUC-ROC is logged: training stops once it clears `target_auc` (or at `unet_steps` / `max_minutes`).

Everything resumes: the VAE stage is skipped once saved, and stage 2 restarts from its last checkpoint
(model, EMA, optimizer, step, RNG). The result is exported as a diffusers StableDiffusionPipeline
directory with a model card.

Training can also continue from an exported model (`--init-from toyworld` or a directory): its VAE is
kept and stage 2 starts from its (EMA) text encoder and UNet with a fresh optimizer, so the shipped model
can be trained further without the original run's work dir. `--vae-from toyworld` (or a directory) instead
keeps only that model's VAE and trains a new text encoder and UNet on its latents, e.g. a wider UNet
(`--unet-channels`) for the same latent space.

Options that change the recipe, each described with what it was for and what it measured in
docs/toyworld.md ("The pretraining recipe's options"):

    --loss-weighting eps|v|p2        how each timestep's epsilon MSE counts (eps: as Stable Diffusion)
    --lr-schedule constant|cosine    cosine anneals from --lr to 5% of it at --unet-steps
    --device cuda                    train on a GPU (use --batch 512 there)
    --freeze-text-encoder            with --init-from: train the UNet alone under the exported text encoder
    --text-encoder-from DIR          with --init-from: take the text encoder from another model
    --sample-every N                 write a grid of samples to the work dir every N steps
    --sample-steps N                 the grids' sampler steps (default 50)

    trainers pretrain-toyworld --out factory/models/toyworld --work-dir runs/toyworld-pretrain
    trainers pretrain-toyworld --init-from toyworld --freeze-text-encoder --loss-weighting eps \
        --lr-schedule cosine --unet-steps 3600 --target-auc none --out runs/x/model --work-dir runs/x/work
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from factory.method.prompts import padded_ids
from factory.toyworld import model as tw_model
from factory.toyworld.tokenizer import write_clip_tokenizer
from factory.toyworld.world import CONCEPTS, caption_variants, render, vocabulary
from trainers.ema import EMA
from trainers.toyworld.quality import sample_grid

EVAL_SEED_BASE = 1_000_000_000  # held-out renders: training pools use seeds < pool_size


@dataclass
class PretrainConfig:
    out: str = "factory/models/toyworld"
    work_dir: str = "runs/toyworld-pretrain"
    seed: int = 0
    pool_size: int = 24000
    vae_steps: int = 1000
    vae_batch: int = 16
    vae_lr: float = 2e-3
    kl_weight: float = 1e-5
    unet_steps: int = 16000
    batch: int = 16
    lr: float = 3e-4
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    eval_every: int = 500
    eval_images: int = 32
    ckpt_every: int = 250
    target_auc: float | None = 0.93
    max_minutes: float | None = None
    threads: int | None = None
    init_from: str | None = None
    loss_weighting: str = "eps"
    lr_schedule: str = "constant"
    max_weight: float = 20.0
    sample_every: int | None = None
    sample_steps: int = 50  # the sampler steps of each --sample-every grid
    device: str = "cpu"
    unet_channels: str | None = None  # e.g. "64,128,128"; default: factory.toyworld.model.UNET_CHANNELS
    unet_layers: int = 1
    vae_from: str | None = None  # an exported model whose VAE a new UNet is trained on (stage 1 skipped)
    freeze_text_encoder: bool = False  # with --init-from: train the UNet only, as Stable Diffusion does
    text_encoder_from: str | None = None  # with --init-from: its UNet goes on under this model's text encoder

    def __post_init__(self):  # fail before minutes of rendering, not after
        if self.unet_channels is not None:
            tw_model.check_unet_channels(parse_channels(self.unet_channels))
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}"
            )
        if self.unet_layers < 1:
            raise ValueError(f"--unet-layers must be >= 1, got {self.unet_layers}")
        if self.init_from is not None and (self.unet_channels is not None or self.unet_layers != 1):
            raise ValueError(
                "--unet-channels / --unet-layers set the size of a new UNet; with --init-from the UNet "
                f"is {self.init_from}'s, whatever its size: drop them"
            )
        if self.init_from is not None and self.vae_from is not None:
            raise ValueError(
                "--init-from already keeps that model's VAE; --vae-from is for a new UNet: drop one"
            )
        if self.freeze_text_encoder and self.init_from is None:
            raise ValueError(
                "--freeze-text-encoder keeps a trained text encoder fixed: it needs --init-from "
                "(a new text encoder would stay random)"
            )
        if self.text_encoder_from is not None and self.init_from is None:
            raise ValueError(
                "--text-encoder-from puts another model's text encoder under --init-from's UNet: it "
                "needs --init-from"
            )


def render_pool(n: int, seed_base: int = 0, desc: str = "render", workers: int | None = None) -> list:
    """Renders seeds seed_base .. seed_base + n - 1, in that order. `workers` > 1 renders in that many
    processes (the same samples: a render depends only on its seed); None uses every CPU for pools of 2000
    or more. 24000 renders on 2 cores: 28 s in one process, 22 s in two (each spawned worker first imports
    the main module, ~5 s when that is this trainer's CLI)."""
    seeds = range(seed_base, seed_base + n)
    if workers is None:
        workers = (os.cpu_count() or 1) if n >= 2000 else 1
    if workers <= 1:
        return [render(s) for s in tqdm(seeds, desc=desc, leave=False, mininterval=2)]
    # spawn, not fork: this process may already run torch's thread pools
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as ex:
        return list(
            tqdm(ex.map(render, seeds, chunksize=256), total=n, desc=desc, leave=False, mininterval=2)
        )


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_run(
    path: Path, models: dict, opt, ema, step: int, history: list, elapsed: float, rng, **extra
) -> None:
    """A training run's checkpoint, written atomically: the models' state dicts under their names, the
    optimizer, the EMA, the step, the history, the training minutes so far, both RNGs, and `extra` (done,
    config, commands)."""
    _atomic_save(
        {
            **{name: m.state_dict() for name, m in models.items()},
            "opt": opt.state_dict(),
            "ema": ema.shadow,
            "ema_updates": ema.updates,
            "step": step,
            "history": history,
            "elapsed": elapsed,
            "rng": rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            **extra,
        },
        path,
    )


def record_eval(
    history: list, tag: str, step: int, losses: list, auc: float, by_concept: dict, minutes: float
):
    """Append one evaluation (mean loss since the last, AUC, AUC per concept) to `history`; print it."""
    history.append(
        {
            "step": step,
            "loss": float(np.mean(losses)),
            "auc": auc,
            "auc_per_concept": by_concept,
            "minutes": minutes,
        }
    )
    worst = min(by_concept, key=by_concept.get)
    tqdm.write(
        f"[{tag}] step {step}: loss {history[-1]['loss']:.4f}, concept-map AUC {auc:.3f} "
        f"(lowest concept: {worst} {by_concept[worst]:.3f}), {minutes:.1f} min"
    )


def load_run(state: dict, models: dict, opt, ema, rng) -> tuple[int, list, float, list]:
    """Restore a `save_run` checkpoint (loaded with `torch.load`) into the models, optimizer, EMA and RNGs;
    returns (step, history, elapsed seconds, commands)."""
    for name, m in models.items():
        m.load_state_dict(state[name])
    opt.load_state_dict(state["opt"])
    ema.load_state_dict({"shadow": state["ema"], "updates": state["ema_updates"]})
    rng.bit_generator.state = state["rng"]
    torch.set_rng_state(state["torch_rng"].cpu())
    return state["step"], state["history"], state["elapsed"], state.get("commands", [])


# ----------------------------------------------------------------------------- stage 1: the VAE


def train_vae(cfg: PretrainConfig, pool_images: np.ndarray, work: Path):
    from diffusers import AutoencoderKL

    vae_dir = work / "vae"
    if (vae_dir / "config.json").exists():
        print(f"[vae] found {vae_dir}, skipping stage 1")
        return AutoencoderKL.from_pretrained(vae_dir)
    torch.manual_seed(cfg.seed)
    vae = tw_model.build_vae().to(cfg.device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.vae_steps, eta_min=cfg.vae_lr * 0.05)
    rng = np.random.default_rng(cfg.seed)
    t0 = time.time()
    bar = tqdm(range(cfg.vae_steps), desc="vae", mininterval=5)
    for step in bar:
        x = to_tensor(pool_images[rng.integers(len(pool_images), size=cfg.vae_batch)]).to(cfg.device)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        mse = F.mse_loss(rec, x)
        kl = post.kl().mean() / x[0].numel()
        loss = mse + F.l1_loss(rec, x) * 0.5 + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 20 == 0:
            bar.set_postfix(
                mse=f"{mse.item():.4f}", kl=f"{kl.item():.2f}", it_s=f"{(step + 1) / (time.time() - t0):.2f}"
            )
    vae.eval()
    with torch.no_grad():
        lat = torch.cat(
            [
                vae.encode(to_tensor(pool_images[i : i + 256]).to(cfg.device)).latent_dist.sample()
                for i in range(0, min(len(pool_images), 2048), 256)
            ]
        )
    scaling = float(1.0 / lat.std())
    vae.register_to_config(scaling_factor=scaling)
    vae.save_pretrained(vae_dir)
    print(
        f"[vae] {cfg.vae_steps} steps in {time.time() - t0:.0f}s, final mse {mse.item():.4f}, "
        f"scaling_factor {scaling:.4f}"
    )
    return vae


@torch.no_grad()
def encode_pool(vae, pool_images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in tqdm(range(0, len(pool_images), 256), desc="encode pool", leave=False, mininterval=5):
        post = vae.encode(to_tensor(pool_images[i : i + 256]).to(vae.device)).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


# ----------------------------------------------------------------------------- stage 2: text + UNet


@torch.no_grad()
def attention_auc(
    unet, text_encoder, tokenizer, vae, scheduler, n_images: int, seed: int = 0
) -> tuple[float, dict[str, float]]:
    """The paper's probe (40 of 50 DDIM steps, prompt "a photo of a {concept}") on held-out renders: the pixel
    AUC-ROC over all of them, and per concept (a few images each: a rough figure, but one concept's attention
    can collapse while the pooled AUC barely moves, as a 64-wide UNet's "star" did)."""
    from factory.method.latents import encode_images
    from factory.method.probe import mean_attention_map, probe_timesteps
    from factory.method.prompts import encode_prompts, token_weight_matrix
    from trainers.evaluate.metrics import pixel_auc, pixel_auc_by_group

    samples = [render(EVAL_SEED_BASE + i, background_only=False) for i in range(n_images)]
    prompts = [f"a photo of a {s.concept}" for s in samples]
    weights = token_weight_matrix(tokenizer, prompts, [[s.concept] for s in samples])
    gens = [torch.Generator().manual_seed(seed + i) for i in range(n_images)]
    x = to_tensor(np.stack([s.image for s in samples]))
    lat = encode_images(vae, x, gens)
    emb = encode_prompts(tokenizer, text_encoder, prompts)
    maps = mean_attention_map(
        unet, scheduler, lat, emb, weights.to(lat.device), probe_timesteps(scheduler, 50, 40), gens
    )
    up = F.interpolate(maps[:, None].float().cpu(), size=x.shape[-1], mode="nearest")[:, 0].numpy()
    gts = [s.mask for s in samples]
    return pixel_auc(list(up), gts), pixel_auc_by_group(list(up), gts, [s.concept for s in samples])


LOSS_WEIGHTINGS = ("eps", "v", "p2")
LR_SCHEDULES = ("constant", "cosine")


def learning_rate(cfg: PretrainConfig, step: int) -> float:
    """The UNet + text encoder learning rate at `step` of this run: `constant`, or `cosine` from cfg.lr down
    to 5% of it at cfg.unet_steps (a function of the step alone, so a resumed run follows the same curve)."""
    return scheduled_lr(cfg.lr, cfg.lr_schedule, step, cfg.unet_steps)


def scheduled_lr(lr: float, schedule: str, step: int, total: int) -> float:
    """`lr` at `step` of `total` under `schedule`: `constant`, or `cosine` down to 5% of it at `total`."""
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise ValueError(
            f"unknown learning-rate schedule {schedule!r}; choose one of {', '.join(LR_SCHEDULES)}"
        )
    progress = min(step / max(total, 1), 1.0)
    return lr * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * progress)))


def timestep_weights(noise_sched, kind: str, max_weight: float = 20.0) -> torch.Tensor:
    """Per-timestep weights of the epsilon MSE (see the module docstring), normalised to mean 1 over t."""
    ab = noise_sched.alphas_cumprod.double()
    snr = ab / (1.0 - ab)
    if kind == "eps":
        w = torch.ones_like(snr)
    elif kind == "v":
        w = torch.clamp(1.0 + 1.0 / snr, max=max_weight)
    elif kind == "p2":
        w = 1.0 / (1.0 + snr)
    else:
        raise ValueError(f"unknown loss weighting {kind!r}; choose one of {', '.join(LOSS_WEIGHTINGS)}")
    return (w / w.mean()).float()


def parse_channels(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(c) for c in text.split(","))
    except ValueError:
        raise ValueError(
            f"--unet-channels takes three comma-separated integers like 64,128,128, got {text!r}"
        ) from None


def _initial_weights(cfg: PretrainConfig, tokenizer):
    """Fresh models, or the text encoder and UNet of an exported model (`init_from`)."""
    if cfg.init_from is None:
        torch.manual_seed(cfg.seed + 1)
        channels = tw_model.UNET_CHANNELS if cfg.unet_channels is None else parse_channels(cfg.unet_channels)
        return tw_model.build_unet(channels, cfg.unet_layers), tw_model.build_text_encoder(tokenizer)
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from factory.method.loading import resolve_model

    unet = UNet2DConditionModel.from_pretrained(Path(resolve_model(cfg.init_from)) / "unet")
    flag, te_source = (
        ("--text-encoder-from", cfg.text_encoder_from)
        if cfg.text_encoder_from
        else ("--init-from", cfg.init_from)
    )
    text_encoder = CLIPTextModel.from_pretrained(Path(resolve_model(te_source)) / "text_encoder")
    if text_encoder.config.vocab_size != len(tokenizer):
        raise ValueError(
            f"{flag} {te_source}: its text encoder has {text_encoder.config.vocab_size} "
            f"tokens, the toyworld tokenizer {len(tokenizer)}; it is not a toyworld model"
        )
    if text_encoder.config.hidden_size != unet.config.cross_attention_dim:
        raise ValueError(
            f"{flag} {te_source}: its text encoder is {text_encoder.config.hidden_size} wide, "
            f"{cfg.init_from}'s UNet reads {unet.config.cross_attention_dim}-wide text embeddings"
        )
    return unet, text_encoder


def train_unet(
    cfg: PretrainConfig,
    vae,
    tokenizer,
    pool: list,
    work: Path,
    deadline: float | None,
    command: str | None = None,
):
    """Stage 2: train the UNet (and, unless frozen, the text encoder) on the pool's VAE latents.

    1. encode the render pool once with the trained VAE (mean and std of each latent);
    2. build the models (from scratch or `--init-from`), the optimizer, the EMA and the schedulers;
    3. resume from `work/unet_ckpt.pt` if a checkpoint is there;
    4. train: sample a batch, noise it, weighted epsilon loss, AdamW step, EMA update;
    5. every `eval_every` steps measure the EMA model's attention AUC, checkpoint, stop at the target or
       the deadline;
    6. return the EMA models and the run's history.

    `command` (the invocation) is appended to the commands kept in the checkpoint, so that a run resumed over
    several invocations exports all of them.
    """
    # 1. The pool's latents, encoded once.
    lat_mean, lat_std = encode_pool(vae, np.stack([s.image for s in pool]))
    sf = vae.config.scaling_factor

    # 2. Models, optimizer, EMA, schedulers.
    unet, text_encoder = _initial_weights(cfg, tokenizer)
    unet, text_encoder = unet.to(cfg.device), text_encoder.to(cfg.device)
    text_encoder.requires_grad_(not cfg.freeze_text_encoder)

    def trained_params(unet_, text_encoder_) -> list:
        """What the optimizer and the EMA hold, in one order for the training models and their EMA copies."""
        return list(unet_.parameters()) + (
            [] if cfg.freeze_text_encoder else list(text_encoder_.parameters())
        )

    params = trained_params(unet, text_encoder)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    ema = EMA(params, cfg.ema_decay)
    noise_sched = tw_model.build_train_scheduler()
    weights = timestep_weights(noise_sched, cfg.loss_weighting, cfg.max_weight).to(cfg.device)
    ddim = tw_model.build_scheduler()
    rng = np.random.default_rng(cfg.seed + 2)
    step, history, elapsed_before, commands = 0, [], 0.0, []
    models = {"unet": unet, "text_encoder": text_encoder}  # what a checkpoint holds, by name

    # 3. Resume.
    ckpt_path = work / "unet_ckpt.pt"
    if ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=True, map_location=cfg.device)
        was_frozen = state.get("config", {}).get("freeze_text_encoder", False)
        if was_frozen != cfg.freeze_text_encoder:
            raise ValueError(
                f"{ckpt_path} was trained {'with' if was_frozen else 'without'} "
                f"--freeze-text-encoder: resume it the same way, or use a new --work-dir"
            )
        step, history, elapsed_before, commands = load_run(state, models, opt, ema, rng)
        print(f"[unet] resumed from step {step} ({elapsed_before / 60:.1f} min trained so far)")

    if command:
        commands = [*commands, command]
    eval_unet = copy.deepcopy(unet).eval()  # holds the EMA weights for evaluation and export
    eval_text = copy.deepcopy(text_encoder).eval()
    eval_params = trained_params(eval_unet, eval_text)

    def save(done: bool = False):
        elapsed = elapsed_before + time.time() - t_start
        save_run(
            ckpt_path,
            models,
            opt,
            ema,
            step,
            history,
            elapsed,
            rng,
            done=done,
            config=asdict(cfg),
            commands=commands,
        )

    t_start = time.time()
    bar = tqdm(
        total=cfg.unet_steps,
        initial=step,
        desc="unet" if cfg.freeze_text_encoder else "unet+text",
        mininterval=5,
    )
    losses: list[float] = []
    reached = False
    if cfg.init_from is not None and not ckpt_path.exists():
        te = (
            f"the text encoder of {cfg.text_encoder_from} and the UNet"
            if cfg.text_encoder_from
            else "the text encoder and UNet"
        )
        print(f"[unet] starting from {te} of {cfg.init_from}")
    # 4. Train.
    while step < cfg.unet_steps:
        unet.train()
        text_encoder.train(not cfg.freeze_text_encoder)
        idx = rng.integers(len(pool), size=cfg.batch)
        z0 = (lat_mean[idx] + lat_std[idx] * torch.randn_like(lat_std[idx])) * sf
        captions = ["" if rng.random() < cfg.caption_dropout else caption_variants(pool[i], rng) for i in idx]
        ids = padded_ids(tokenizer, captions).to(cfg.device)
        noise = torch.randn_like(z0)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg.batch,)).to(cfg.device)
        with torch.set_grad_enabled(not cfg.freeze_text_encoder):
            text = text_encoder(ids)[0]
        pred = unet(noise_sched.add_noise(z0, noise, t), t, encoder_hidden_states=text).sample
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * weights[t]).mean()
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update()
        step += 1
        losses.append(per_sample.mean().item())  # the plain epsilon MSE, comparable across weightings
        bar.update(1)
        if step % 25 == 0:
            rate = (step - bar.initial) / (time.time() - t_start)
            bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}", steps_s=f"{rate:.2f}")
        # 5. Evaluate, sample, checkpoint, stop.
        if step % cfg.eval_every == 0 or step == cfg.unet_steps:
            ema.copy_to(eval_params)
            auc, by_concept = attention_auc(eval_unet, eval_text, tokenizer, vae, ddim, cfg.eval_images)
            minutes = (elapsed_before + time.time() - t_start) / 60
            record_eval(history, "unet", step, losses[-cfg.eval_every :], auc, by_concept, minutes)
            if cfg.target_auc is not None and auc >= cfg.target_auc:
                reached = True
        if cfg.sample_every and step % cfg.sample_every == 0:
            ema.copy_to(eval_params)
            sample_grid(
                build_pipeline(vae, eval_text, tokenizer, eval_unet),
                work / f"samples-{step:06d}.png",
                per_concept=6,
                steps=cfg.sample_steps,
            )
        if step % cfg.ckpt_every == 0 or reached:
            save()
        if reached:
            tqdm.write(f"[unet] attention AUC cleared the target {cfg.target_auc}: stopping")
            break
        if deadline is not None and time.time() > deadline:
            tqdm.write("[unet] time budget reached: checkpointing and stopping (re-run to resume)")
            save()
            break
    bar.close()
    save(done=True)

    # 6. The EMA models and the history.
    ema.copy_to(eval_params)
    return (
        eval_unet,
        eval_text,
        {
            "steps": step,
            "history": history,
            "loss_curve": losses,
            "commands": commands,
            "train_minutes": (elapsed_before + time.time() - t_start) / 60,
        },
    )


def build_pipeline(vae, text_encoder, tokenizer, unet):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=tw_model.build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def export_pipeline(out: Path, vae, text_encoder, tokenizer, unet) -> Path:
    build_pipeline(vae, text_encoder, tokenizer, unet).save_pretrained(out, safe_serialization=True)
    return out


def prepare_device(device: str) -> None:
    """Process-wide settings for training on `device`: on a GPU, float32 matmuls in TF32."""
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # as cuDNN's convolutions already do by default


def hardware_name(device: str) -> str:
    return (
        torch.cuda.get_device_name(device)
        if device.startswith("cuda")
        else f"{torch.get_num_threads()} CPU threads"
    )


def toyworld_tokenizer(directory: Path):
    """The toyworld CLIP tokenizer (the caption grammar's vocabulary), written to `directory` and loaded."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(write_clip_tokenizer(directory, vocabulary(), tw_model.MAX_TOKENS))


def pretrain(cfg: PretrainConfig, command: str | None = None) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    prepare_device(cfg.device)
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + cfg.max_minutes * 60 if cfg.max_minutes else None
    t0 = time.time()
    tokenizer = toyworld_tokenizer(work / "tokenizer")
    pool = render_pool(cfg.pool_size, 0, "render pool")
    pool_images = np.stack([s.image for s in pool])
    previous = None
    vae_source = cfg.init_from or cfg.vae_from
    if vae_source is None:
        vae = train_vae(cfg, pool_images, work)
    else:
        from diffusers import AutoencoderKL

        from factory.method.loading import resolve_model

        src = Path(resolve_model(vae_source))
        print(
            f"[vae] taken from {src} ({'--init-from' if cfg.init_from else '--vae-from'}), skipping stage 1"
        )
        vae = AutoencoderKL.from_pretrained(src / "vae")
        if cfg.init_from is not None and (src / "training.json").exists():
            previous = json.loads((src / "training.json").read_text())
    vae = vae.to(cfg.device).eval()
    for p in vae.parameters():
        p.requires_grad_(False)
    unet, text_encoder, info = train_unet(cfg, vae, tokenizer, pool, work, deadline, command)
    export_pipeline(Path(cfg.out), vae, text_encoder, tokenizer, unet)  # save_pretrained copies to the CPU
    if cfg.sample_every:
        sample_grid(
            build_pipeline(vae, text_encoder, tokenizer, unet),
            work / "samples-final.png",
            per_concept=6,
            steps=cfg.sample_steps,
        )
    info.pop("loss_curve")
    hardware = hardware_name(cfg.device)  # runs before this field: 2 CPU cores
    info.update(
        {
            "config": asdict(cfg),
            "wall_minutes_this_run": (time.time() - t0) / 60,
            "hardware": hardware,
            "concepts": list(CONCEPTS),
        }
    )
    if not info["commands"]:
        info.pop("commands")
    if previous is not None:  # the model this run continued from, so the card can state the whole recipe
        info["continued_from"] = {
            k: previous[k]
            for k in (
                "steps",
                "train_minutes",
                "history",
                "config",
                "commands",
                "hardware",
                "note",
                "continued_from",
            )
            if k in previous
        }
    (Path(cfg.out) / "training.json").write_text(json.dumps(info, indent=2))
    print(
        f"[done] exported to {cfg.out}; {info['steps']} UNet steps, "
        f"{info['train_minutes']:.1f} min of UNet training, last AUC "
        f"{info['history'][-1]['auc'] if info['history'] else float('nan'):.3f}"
    )
    return info


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(
        prog="trainers pretrain-toyworld",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    def optional(typ):
        return lambda text: None if text.lower() in ("none", "off", "") else typ(text)

    choices = {"loss_weighting": LOSS_WEIGHTINGS, "lr_schedule": LR_SCHEDULES}

    for name, default in asdict(PretrainConfig()).items():
        if isinstance(default, bool):
            p.add_argument("--" + name.replace("_", "-"), action="store_true")
            continue
        typ = type(default) if default is not None else (float if "minutes" in name or "auc" in name else int)
        if name in ("target_auc", "max_minutes", "threads"):
            typ = optional(int if name == "threads" else float)
        if name in ("init_from", "unet_channels", "vae_from", "text_encoder_from"):
            typ = optional(str)
        if name == "sample_every":
            typ = optional(int)
        extra = {"choices": choices[name]} if name in choices else {}
        p.add_argument(
            "--" + name.replace("_", "-"),
            type=typ,
            default=default,
            help="'none' disables" if name in ("target_auc", "max_minutes") else None,
            **extra,
        )
    args = p.parse_args(argv)
    pretrain(
        PretrainConfig(**vars(args)),
        command=shlex.join(["trainers", "pretrain-toyworld", *(sys.argv[1:] if argv is None else argv)]),
    )


if __name__ == "__main__":
    main()
