"""Pretrain the toyworld DiT: a FLUX.1-architecture text-to-image model, from scratch on toyworld renders.

The model (`factory.toyworld.model`, "the toyworld DiT") is what `FluxPipeline` loads and the `flux` family
serves, at toyworld's size: 64x64 images, 16x16x4 latents packed into 64 tokens of 2 x 2 patches. The recipe:

1. render the pool (the SD model's: seeds 0..pool_size-1) and encode it once with the VAE of `--vae-from`
   (the shipped toyworld model's by default: the DiT shares its latent space);
2. CLIP, FLUX's pooled vector, is that model's text encoder, frozen (FLUX.1's text encoders are frozen);
3. the T5 encoder (a new 2-layer one over the grammar's vocabulary) and the transformer are trained jointly
   with the rectified-flow objective of SD3 and FLUX: x_s = (1 - s) x0 + s noise, the target is
   noise - x0, s drawn logit-normal (mean 0, std 1), 10% caption dropout, an EMA copy. CLIP's pooled vector
   is dropped (the empty caption's) for half the samples on its own, as SD3 drops each text encoder
   independently: with it always there, the pooled vector alone told the model the shape (a trained
   CLIP from the first step; the T5 tokens and their attention were not used by step 3000, the concept map's
   AUC stayed below 0.5);
4. every `eval_every` steps the EMA model's concept-map AUC is measured through the Distiller's own probe
   (`image_to_text`, the paper's 40 of 50 steps) on held-out renders, and the run checkpoints;
5. the EMA model is exported as a diffusers `FluxPipeline` directory.

Departures from FLUX.1, each forced by toyworld: the T5 is trained with the transformer (no pretrained T5
of the grammar exists; FLUX's T5-XXL is frozen), and the model has no guidance embedding (it is not
guidance-distilled, like FLUX.1-schnell).

A run resumes from its work dir's checkpoint (model, EMA, optimizer, step, RNG) when run again.

Training can also continue from an exported DiT (`--init-from toyworld-dit` or a directory): its VAE, CLIP,
T5 and transformer (the EMA weights it was exported with) with a fresh optimizer, so the shipped model can
be trained further without the original run's work dir; the export's training.json keeps the earlier runs
under `continued_from`. `--lr-schedule cosine` anneals from --lr to 5% of it at --steps (this run's steps).

    trainers pretrain-toyworld-dit --out factory/models/toyworld-dit --work-dir runs/dit --max-minutes 80
    trainers pretrain-toyworld-dit --init-from toyworld-dit --lr-schedule cosine --steps 13000 \
        --out runs/dit2/model --work-dir runs/dit2/work
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from factory.method.prompts import padded_ids
from factory.toyworld import model as tw_model
from factory.toyworld.tokenizer import write_t5_tokenizer
from factory.toyworld.world import CONCEPTS, caption_variants, render, vocabulary
from trainers.ema import EMA
from trainers.toyworld.pretrain import (
    EVAL_SEED_BASE,
    LR_SCHEDULES,
    encode_pool,
    load_run,
    record_eval,
    render_pool,
    save_run,
    scheduled_lr,
)
from trainers.toyworld.quality import training_runs


@dataclass
class DiTPretrainConfig:
    out: str = "factory/models/toyworld-dit"
    work_dir: str = "runs/toyworld-dit"
    vae_from: str = "toyworld"  # the VAE and the (frozen) CLIP text encoder of this exported model
    init_from: str | None = None  # an exported DiT to go on training (all its components)
    lr_schedule: str = "constant"  # or "cosine": from lr to 5% of it at `steps`
    seed: int = 0
    pool_size: int = 24000
    steps: int = 100000
    batch: int = 32
    lr: float = 3e-4
    warmup: int = 500
    caption_dropout: float = 0.1
    pooled_dropout: float = 0.5  # CLIP's pooled vector alone, as SD3's independent text-encoder dropout
    ema_decay: float = 0.999
    eval_every: int = 1000
    eval_images: int = 32
    ckpt_every: int = 500
    max_minutes: float | None = None
    threads: int | None = None
    width: int = tw_model.DIT_WIDTH
    heads: int = tw_model.DIT_HEADS
    double_layers: int = tw_model.DIT_DOUBLE
    single_layers: int = tw_model.DIT_SINGLE
    device: str = "cpu"


@torch.no_grad()
def concept_map_auc(pipe, n_images: int, seed: int = 0) -> tuple[float, dict[str, float]]:
    """The pixel AUC-ROC of the Distiller's concept maps (`image_to_text`, the paper's probe: 40 of 50 steps,
    "a photo of a {concept}") on held-out renders, pooled and per concept."""
    from factory.method.distiller import Distiller
    from factory.method.settings import Concept, DistillConfig, SampleSpec
    from trainers.evaluate.metrics import pixel_auc, pixel_auc_by_group

    samples = [render(EVAL_SEED_BASE + i, background_only=False) for i in range(n_images)]
    distiller = Distiller("toyworld-dit", pipeline=pipe, config=DistillConfig(micro_batch=n_images))
    specs = [SampleSpec(Concept(s.concept), seed + i) for i, s in enumerate(samples)]
    maps = distiller.probe([s.image for s in samples], specs).attention
    up = F.interpolate(maps[:, None].float().cpu(), size=samples[0].image.shape[0], mode="nearest")[:, 0]
    gts = [s.mask for s in samples]
    return pixel_auc(list(up.numpy()), gts), pixel_auc_by_group(
        list(up.numpy()), gts, [s.concept for s in samples]
    )


def build_pipeline(vae, clip, clip_tokenizer, t5, t5_tokenizer, transformer):
    from diffusers import FluxPipeline

    pipe = FluxPipeline(
        scheduler=tw_model.build_flow_scheduler(),
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_parent(cfg: DiTPretrainConfig, init_dir: Path | None = None):
    """The VAE (with FLUX's `shift_factor`, 0) and the frozen CLIP text encoder + tokenizer of `vae_from`
    (of `init_dir`, the checked `init_from`, when given)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    from factory.method.loading import resolve_model

    src = init_dir or Path(resolve_model(cfg.vae_from))
    vae = AutoencoderKL.from_pretrained(src / "vae")
    if vae.config.get("shift_factor") is None:
        vae.register_to_config(shift_factor=0.0)  # FluxPipeline decodes latents / scale + shift
    clip = CLIPTextModel.from_pretrained(src / "text_encoder")
    clip_tokenizer = CLIPTokenizer.from_pretrained(src / "tokenizer")
    for module in (vae, clip):
        module.requires_grad_(False).eval().to(cfg.device)
    return vae, clip, clip_tokenizer


def init_source(cfg: DiTPretrainConfig) -> Path | None:
    """The directory of `init_from`, checked to be an exported DiT (a clear error before any work)."""
    if cfg.init_from is None:
        return None
    sizes = ("width", "heads", "double_layers", "single_layers", "vae_from")
    changed = [k for k in sizes if getattr(cfg, k) != getattr(DiTPretrainConfig, k)]
    if changed:
        raise ValueError(
            f"--init-from {cfg.init_from} keeps that model's size and VAE; "
            f"{', '.join('--' + k.replace('_', '-') for k in changed)} are for a new model: drop them"
        )
    from factory.method.loading import resolve_model

    src = Path(resolve_model(cfg.init_from))
    if not (src / "transformer").is_dir() or not (src / "text_encoder_2").is_dir():
        raise ValueError(
            f"--init-from {cfg.init_from}: {src} is not an exported toyworld DiT (no transformer/ and "
            "text_encoder_2/)"
        )
    if Path(cfg.out).resolve() == src.resolve():
        raise ValueError(f"--out {cfg.out} is --init-from's own directory: export to a new one")
    return src


def initial_weights(cfg: DiTPretrainConfig, t5_tokenizer, init_dir: Path | None):
    """A new transformer and T5 (seeded, of cfg's size), or those of the exported DiT `init_dir` (the checked
    `init_from`) with its training.json (None for new ones)."""
    if init_dir is None:
        torch.manual_seed(cfg.seed + 1)
        transformer = tw_model.build_flux_transformer(
            cfg.width, cfg.heads, cfg.double_layers, cfg.single_layers
        )
        return transformer, tw_model.build_t5_encoder(t5_tokenizer), None
    from diffusers import FluxTransformer2DModel
    from transformers import T5EncoderModel

    t5 = T5EncoderModel.from_pretrained(init_dir / "text_encoder_2")
    if t5.config.vocab_size != len(t5_tokenizer):
        raise ValueError(
            f"--init-from {cfg.init_from}: its T5 has {t5.config.vocab_size} tokens, the toyworld T5 "
            f"tokenizer {len(t5_tokenizer)}; it is not a toyworld DiT"
        )
    transformer = FluxTransformer2DModel.from_pretrained(init_dir / "transformer")
    info = init_dir / "training.json"
    print(f"[dit] starting from the transformer and T5 of {init_dir}")
    return transformer, t5, json.loads(info.read_text()) if info.exists() else None


def pretrain_dit(cfg: DiTPretrainConfig, command: str | None = None) -> dict:
    """Stage 2 of the recipe above for the DiT (steps 1-5 of the module docstring)."""
    from transformers import T5TokenizerFast

    from factory.method.families import Conditioning, FluxDenoiser

    init_dir = init_source(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    deadline = t0 + cfg.max_minutes * 60 if cfg.max_minutes else None

    # 1. The pool's latents, encoded once by the parent's VAE; the trained models (new, or `init_from`'s)
    #    first, so that an export whose T5 is not toyworld's fails before the pool is rendered.
    vae, clip, clip_tokenizer = load_parent(cfg, init_dir)
    t5_tokenizer = T5TokenizerFast.from_pretrained(
        write_t5_tokenizer(work / "tokenizer_2", vocabulary(), tw_model.MAX_TOKENS)
    )
    transformer, t5, previous = initial_weights(cfg, t5_tokenizer, init_dir)
    pool = render_pool(cfg.pool_size, 0, "render pool")
    lat_mean, lat_std = encode_pool(vae, np.stack([s.image for s in pool]))
    sf, shift = vae.config.scaling_factor, vae.config.shift_factor

    # 2. Pooled CLIP vectors (frozen), cached per caption.
    pooled_cache: dict[str, torch.Tensor] = {}

    def pooled(captions: list[str]) -> torch.Tensor:
        missing = sorted({c for c in captions if c not in pooled_cache})
        if missing:
            ids = padded_ids(clip_tokenizer, missing).to(cfg.device)
            with torch.no_grad():
                out = clip(ids).pooler_output
            pooled_cache.update(zip(missing, out, strict=True))
        return torch.stack([pooled_cache[c] for c in captions])

    # 3. The trained models on the device, optimizer, EMA; resume.
    transformer, t5 = transformer.to(cfg.device), t5.to(cfg.device)
    models = {"transformer": transformer, "t5": t5}
    params = list(transformer.parameters()) + list(t5.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    ema = EMA(params, cfg.ema_decay)
    rng = np.random.default_rng(cfg.seed + 2)
    step, history, elapsed_before, commands = 0, [], 0.0, []
    ckpt_path = work / "dit_ckpt.pt"
    if ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=True, map_location=cfg.device)
        step, history, elapsed_before, commands = load_run(state, models, opt, ema, rng)
        print(f"[dit] resumed from step {step} ({elapsed_before / 60:.1f} min trained so far)")
    if command:
        commands = [*commands, command]
    eval_transformer, eval_t5 = copy.deepcopy(transformer).eval(), copy.deepcopy(t5).eval()
    eval_params = list(eval_transformer.parameters()) + list(eval_t5.parameters())
    denoiser = FluxDenoiser(transformer)
    t_start = time.time()

    def save(done: bool = False) -> None:
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

    def eval_pipe():
        ema.copy_to(eval_params)
        return build_pipeline(vae, clip, clip_tokenizer, eval_t5, t5_tokenizer, eval_transformer)

    # 4. Train: rectified flow, logit-normal noise levels.
    bar = tqdm(total=cfg.steps, initial=step, desc="dit", mininterval=5)
    losses: list[float] = []
    while step < cfg.steps:
        transformer.train()
        t5.train()
        idx = rng.integers(len(pool), size=cfg.batch)
        x0 = (lat_mean[idx] + lat_std[idx] * torch.randn_like(lat_std[idx]) - shift) * sf
        captions = ["" if rng.random() < cfg.caption_dropout else caption_variants(pool[i], rng) for i in idx]
        ids = padded_ids(t5_tokenizer, captions).to(cfg.device)
        sigma = torch.sigmoid(torch.randn(cfg.batch, device=cfg.device))
        noise = torch.randn_like(x0)
        s = sigma[:, None, None, None]
        clip_captions = ["" if rng.random() < cfg.pooled_dropout else c for c in captions]
        cond = Conditioning(t5(ids)[0], pooled(clip_captions))
        pred = denoiser((1 - s) * x0 + s * noise, sigma * 1000, cond)
        loss = F.mse_loss(pred, noise - x0)
        lr = scheduled_lr(cfg.lr, cfg.lr_schedule, step, cfg.steps)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / max(cfg.warmup, 1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update()
        step += 1
        losses.append(loss.item())
        bar.update(1)
        if step % 25 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
        # 5. Evaluate, checkpoint, stop at the deadline.
        if step % cfg.eval_every == 0 or step == cfg.steps:
            auc, by_concept = concept_map_auc(eval_pipe(), cfg.eval_images)
            minutes = (elapsed_before + time.time() - t_start) / 60
            record_eval(history, "dit", step, losses[-cfg.eval_every :], auc, by_concept, minutes)
        if step % cfg.ckpt_every == 0:
            save()
        if deadline is not None and time.time() > deadline:
            tqdm.write("[dit] time budget reached: checkpointing and stopping (re-run to resume)")
            break
    bar.close()
    save(done=step >= cfg.steps)

    # 6. Export the EMA model.
    out = Path(cfg.out)
    eval_pipe().save_pretrained(out, safe_serialization=True)
    info = {
        "steps": step,
        "history": history,
        "commands": commands,
        "train_minutes": (elapsed_before + time.time() - t_start) / 60,
        "config": asdict(cfg),
        "wall_minutes_this_run": (time.time() - t0) / 60,
        "hardware": f"{torch.get_num_threads()} CPU threads" if cfg.device == "cpu" else cfg.device,
        "concepts": list(CONCEPTS),
        "parameters": {
            "transformer": sum(p.numel() for p in transformer.parameters()),
            "text_encoder_2": sum(p.numel() for p in t5.parameters()),
        },
    }
    if previous is not None:  # the model this run continued from, so the card can state the whole recipe
        info["continued_from"] = previous
    (out / "training.json").write_text(json.dumps(info, indent=2))
    write_card(out)
    print(f"[done] exported to {out}; {step} steps, {info['train_minutes']:.1f} min of training")
    return info


CARD_HEAD = """---
library_name: diffusers
tags: [toyworld, flux-architecture, concept-factory]
---
# toyworld-dit: Concept Factory's tiny FLUX.1-architecture model

A FLUX.1-architecture text-to-image rectified-flow transformer, trained from scratch on the toyworld
procedural world (`factory/toyworld/world.py`; 64x64 images, one shape on a textured background). It exists so
that the DiT families' concept maps (`image_to_text` and ConceptAttention's `concept_output`) are measured
against ground truth on any CPU, with no download. Load it with
`factory.method.loading.load_pipeline("toyworld-dit")` or
`FluxPipeline.from_pretrained("factory/models/toyworld-dit")`; the `flux` family serves it.
"""


def write_card(model_dir: Path, results: dict | None = None) -> None:
    """README.md of an exported DiT: its components, the recipe and history from `training.json`, and the
    measured rows of `results` (a `trainers readout-sweep` JSON) if given."""
    model_dir = Path(model_dir)
    info = json.loads((model_dir / "training.json").read_text())
    cfg = info["config"]
    params = info["parameters"]
    arch = json.loads((model_dir / "transformer" / "config.json").read_text())
    rows = [
        "| component | class | size |",
        "|---|---|---|",
        f"| transformer | FluxTransformer2DModel | {params['transformer'] / 1e6:.2f}M params: "
        f"{arch['num_layers']} double- + {arch['num_single_layers']} single-stream blocks, width "
        f"{arch['num_attention_heads'] * arch['attention_head_dim']}, {arch['num_attention_heads']} heads |",
        f"| text_encoder_2 | T5EncoderModel | {params['text_encoder_2'] / 1e6:.2f}M params, trained "
        "with it |",
        "| text_encoder | CLIPTextModel | the toyworld model's, frozen (the pooled vector) |",
        "| vae | AutoencoderKL | the toyworld model's (16x16x4 latents), `shift_factor` 0 |",
    ]
    runs = training_runs(info)  # oldest first: a run that went on from an export follows it
    several = len(runs) > 1  # a column for the run when training went on from an export
    header = "| run " * several + "| step | loss | concept-map AUC | minutes |"
    history = [header, "|---" * (4 + several) + "|"]
    commands, steps, minutes = [], 0, 0.0
    for i, run in enumerate(runs, 1):
        commands += run.get("commands", [])
        history += [
            f"| {i} " * several
            + f"| {steps + h['step']} | {h['loss']:.4f} | {h['auc']:.3f} | {minutes + h['minutes']:.1f} |"
            for h in run["history"]
        ]
        steps, minutes = steps + run["steps"], minutes + run["train_minutes"]
    schedule = (
        f"AdamW {cfg['lr']:g} ({cfg['warmup']} warm-up steps)"
        if cfg.get("lr_schedule", "constant") == "constant"
        else f"AdamW cosine from {cfg['lr']:g} to 5% of it ({cfg['warmup']} warm-up steps)"
    )
    continued = (
        f" (the last run went on from `--init-from {cfg['init_from']}` with a fresh optimizer: "
        f"{info['steps']} steps, {info['train_minutes']:.1f} min)"
        if cfg.get("init_from")
        else ""
    )
    text = [
        CARD_HEAD,
        "\n".join(rows),
        "",
        "FlowMatchEulerDiscreteScheduler with FLUX.1's config (the shift follows the token count: 64 image "
        "tokens at 64 px). The T5 tokenizer is a Unigram vocabulary of the grammar's words "
        "(`factory/toyworld/tokenizer.py`): each word one piece, any other word `<unk>`.",
        "",
        "## Training (`trainers/toyworld/pretrain_dit.py`)",
        "",
        *[f"- `{c}`" for c in commands],
        f"- {steps} steps in all{continued}, batch {cfg['batch']}, {schedule}, EMA {cfg['ema_decay']}, "
        f"caption dropout {cfg['caption_dropout']:g}, pooled-vector dropout "
        f"{cfg.get('pooled_dropout', 0):g}; {minutes:.1f} min on {info['hardware']}; render "
        f"pool of {cfg['pool_size']} (seeds 0..{cfg['pool_size'] - 1}); the AUC on {cfg['eval_images']} "
        "held-out renders "
        "(seeds 1,000,000,000+), the Distiller's probe (`image_to_text`, 40 of 50 steps).",
        "- Departures from FLUX.1: T5 trained with the transformer (no pretrained T5 of the grammar "
        "exists), no guidance embedding (not guidance-distilled), CLIP's pooled vector dropped on its own "
        "for half the samples (as SD3 drops each text encoder).",
        "",
        *history,
        "",
    ]
    if results is not None:
        from trainers.toyworld.readout_sweep import markdown

        text += [
            "## Measured",
            "",
            f"On `{results['split']}` ({results['rows'][0]['n_images']} images with an object), "
            "`trainers readout-sweep`, paper settings (50 steps, the map over the 40 least-noisy, 50-step "
            "inpainting), pixel-pooled as in the paper's Table 2:",
            "",
            markdown(results["rows"]),
        ]
    (model_dir / "README.md").write_text("\n".join(text))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="trainers pretrain-toyworld-dit",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    types = {"threads": int, "max_minutes": float, "init_from": str}
    for name, default in asdict(DiTPretrainConfig()).items():
        typ = type(default) if default is not None else types[name]
        choices = LR_SCHEDULES if name == "lr_schedule" else None
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=default, choices=choices)
    p.add_argument("--card", default=None, metavar="SWEEP_JSON", help="write --out's model card only")
    args = p.parse_args(argv)
    if args.card is not None:
        write_card(Path(args.out), json.loads(Path(args.card).read_text()))
        return
    del args.card
    pretrain_dit(
        DiTPretrainConfig(**vars(args)),
        command=shlex.join(["trainers", "pretrain-toyworld-dit", *(sys.argv[1:] if argv is None else argv)]),
    )


if __name__ == "__main__":
    main()
