"""Measure the toyworld foundation model the way the paper measures Stable Diffusion's attention.

On held-out renders (seeds no training or early-stopping run saw) it applies the paper's probe:
VAE-encode, noise independently to each of the 40 least-noisy of 50 DDIM timesteps, one UNet pass with
"a photo of a {concept}", the concept token's softmax cross-attention over every attn2 layer, averaged
over heads, upsampled nearest to latent size, averaged over layers and steps. It reports:

- pixel AUC-ROC of that map against the GT mask;
- IoU of its GMM-midpoint + 3x3-majority mask (at latent resolution, upsampled nearest) against GT;
- the same IoU for Otsu on grayscale and for OpenCV GrabCut with a centred box.

Generation is measured too: the concept accuracy of "a photo of a {concept}" samples read by the toyworld
shape classifier (`trainers/toyworld/classifier.py`), and the caption usage (how much worse the UNet
denoises a render when the prompt names a wrong shape). It also writes a text-to-image sample grid per
concept and an attention figure, and (with --card) the model card. IoU is pooled over all pixels of the set,
as the paper's tables; per-image means are given too.

    python -m trainers.toyworld.quality --model toyworld --n 200 --card
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from factory.method.latents import encode_images
from factory.method.loading import load_pipeline, resolve_model
from factory.method.masks import binarize, otsu
from factory.method.probe import mean_attention_map, probe_timesteps
from factory.method.prompts import encode_prompts, token_weight_matrix
from factory.toyworld.world import CONCEPTS, render
from trainers.evaluate.metrics import PooledSegmentationMetrics, pixel_auc, pixel_auc_by_group
from trainers.evaluate.score import grabcut_mask

QUALITY_SEED_BASE = 1_000_100_000  # disjoint from training pools and from the early-stopping set


def otsu_mask(image: np.ndarray) -> np.ndarray:
    """Otsu on grayscale; the side that touches the image border less is taken as foreground."""
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    m, _ = otsu(gray)
    border = np.ones_like(m)
    border[1:-1, 1:-1] = False
    return m if m[border].mean() <= (~m)[border].mean() else ~m


@torch.no_grad()
def probe_samples(pipe, samples, batch: int = 50, seed: int = 0) -> np.ndarray:
    """Mean attention maps (N, h, w) at latent resolution for toyworld samples."""
    timesteps = probe_timesteps(pipe.scheduler, 50, 40)
    out = []
    for i in range(0, len(samples), batch):
        chunk = samples[i : i + batch]
        prompts = [f"a photo of a {s.concept}" for s in chunk]
        weights = token_weight_matrix(pipe.tokenizer, prompts, [[s.concept] for s in chunk])
        gens = [torch.Generator().manual_seed(seed + s.seed) for s in chunk]
        x = torch.from_numpy(np.stack([s.image for s in chunk])).permute(0, 3, 1, 2).float() / 127.5 - 1
        lat = encode_images(pipe.vae, x.to(pipe.device), gens)
        emb = encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts)
        out.append(mean_attention_map(pipe.unet, pipe.scheduler, lat, emb, weights, timesteps, gens).cpu())
    return torch.cat(out).numpy()


@torch.no_grad()
def caption_usage(pipe, samples, timesteps=(100, 300, 500, 700, 900), seed: int = 0) -> dict[int, float]:
    """How much the shape word helps the UNet denoise: the relative increase of the epsilon MSE on held-out
    renders when the prompt names a wrong shape instead of the right one, per timestep (same noise for both).
    Near 0 means the model ignores the shape word, which is what makes samples ignore it too."""
    g = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1
    z = pipe.vae.encode(x.to(pipe.device)).latent_dist.mean * pipe.vae.config.scaling_factor
    wrong_of = {c: CONCEPTS[(i + len(CONCEPTS) // 2) % len(CONCEPTS)] for i, c in enumerate(CONCEPTS)}
    right = encode_prompts(pipe.tokenizer, pipe.text_encoder, [f"a photo of a {s.concept}" for s in samples])
    wrong = encode_prompts(
        pipe.tokenizer, pipe.text_encoder, [f"a photo of a {wrong_of[s.concept]}" for s in samples]
    )
    ab = pipe.scheduler.alphas_cumprod.to(z.device)
    out = {}
    for t in timesteps:
        noise = torch.randn(z.shape, generator=g).to(z.device)
        zt = ab[t].sqrt() * z + (1 - ab[t]).sqrt() * noise
        tt = torch.full((len(samples),), t, device=z.device)
        mse = [
            F.mse_loss(pipe.unet(zt, tt, encoder_hidden_states=e).sample, noise).item()
            for e in (right, wrong)
        ]
        out[t] = mse[1] / mse[0] - 1.0
    return out


def upsample(maps: np.ndarray, size: int) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[:, None]
    return F.interpolate(t, size=(size, size), mode="nearest")[:, 0].numpy()


def sample_grid(
    pipe, path: Path, per_concept: int = 8, guidance: float = 3.0, steps: int = 50, seed: int = 0
) -> None:
    """A grid of "a photo of a {concept}" samples, one row per concept (the model card's figure)."""
    from trainers.toyworld.classifier import generate

    rows = []
    for ci, concept in enumerate(CONCEPTS):
        imgs = generate(pipe, concept, per_concept, guidance, steps, seed + 1000 * ci, batch=per_concept)
        rows.append(np.concatenate(list((imgs * 255).round().astype(np.uint8)), 1))
    grid = np.concatenate(rows, 0)
    img = Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST)
    labelled = Image.new("RGB", (img.width + 110, img.height), "white")
    labelled.paste(img, (110, 0))
    d = ImageDraw.Draw(labelled)
    cell = img.height // len(CONCEPTS)
    for ci, concept in enumerate(CONCEPTS):
        d.text((8, ci * cell + cell // 2 - 6), concept, fill="black")
    labelled.save(path)


def attention_figure(samples, maps_up, masks, path: Path, n: int = 8) -> None:
    tiles = []
    for s, a, m in list(zip(samples, maps_up, masks, strict=True))[:n]:
        a = (a - a.min()) / (np.ptp(a) + 1e-12)
        heat = cv2.applyColorMap((a * 255).astype(np.uint8), cv2.COLORMAP_VIRIDIS)[..., ::-1]
        gray = lambda b: np.repeat((b[..., None] * 255).astype(np.uint8), 3, 2)  # noqa: E731
        tiles.append(np.concatenate([s.image, heat, gray(m), gray(s.mask)], 1))
    grid = np.concatenate(tiles, 0)
    Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(path)


def evaluate(model: str, n: int, out_dir: Path, grid: bool = True, concept_samples: int = 50) -> dict:
    t0 = time.time()
    pipe = load_pipeline(model)
    samples = [render(QUALITY_SEED_BASE + i, background_only=False) for i in range(n)]
    maps = probe_samples(pipe, samples)
    size = samples[0].image.shape[0]
    maps_up = upsample(maps, size)
    gts = [s.mask for s in samples]
    res = {
        "n_images": n,
        "auc": pixel_auc(list(maps_up), gts),
        "auc_unnormalized": pixel_auc(list(maps_up), gts, False),
        "auc_per_concept": pixel_auc_by_group(list(maps_up), gts, [s.concept for s in samples]),
    }
    gmm_masks = []
    for name, fn in [("gmm", None), ("otsu_gray", otsu_mask), ("grabcut", grabcut_mask)]:
        met = PooledSegmentationMetrics()
        for i, s in enumerate(samples):
            if fn is None:
                m, _ = binarize(maps[i], "gmm")
                pred = upsample(m[None].astype(np.float32), size)[0] > 0.5
                gmm_masks.append(pred)
            else:
                pred = fn(s.image)
            met.update(pred, s.mask)
        res[name] = met.compute()
    out_dir.mkdir(parents=True, exist_ok=True)
    attention_figure(samples, maps_up, gmm_masks, out_dir / "attention.png")
    if grid:
        sample_grid(pipe, out_dir / "samples.png")
    if concept_samples:
        from trainers.toyworld.classifier import concept_accuracy, load_or_train, reconstruction_accuracy

        classifier, info = load_or_train()
        info["vae_reconstruction_accuracy"] = reconstruction_accuracy(classifier, pipe.vae)
        res["classifier"] = info
        for gs in (1.0, 3.0, 7.5):  # 1: no guidance, as the paper generates D'_s; 3: our synthesis default
            res[f"concept_accuracy_g{gs:g}"] = concept_accuracy(pipe, classifier, concept_samples, gs)
    res["caption_usage"] = caption_usage(pipe, samples[:96])
    res["seconds"] = time.time() - t0
    return res


CARD = """---
library_name: diffusers
tags: [toyworld, stable-diffusion-architecture, concept-factory]
---
# toyworld: Concept Factory's tiny foundation model

A Stable-Diffusion-architecture text-to-image latent diffusion model, trained from scratch on the toyworld
procedural world (`factory/toyworld/world.py`): one shape ({concepts}) on a cluttered textured background,
64x64 pixels. It exists so that the whole concept-distillation method runs, and is measured against ground
truth, on any CPU with no download. Load it with `factory.method.loading.load_pipeline("toyworld")` or
`StableDiffusionPipeline.from_pretrained("{path}")`.

| component | class | size |
|---|---|---|
{components}

DDIMScheduler with SD v1's schedule (scaled_linear, beta 0.00085-0.012, 1000 steps, steps_offset 1). The
tokenizer is a CLIP-format BPE vocabulary of {vocab} tokens built from the caption grammar
(`factory/toyworld/tokenizer.py`), {max_tokens} positions; every grammar word is one token, so in
"a photo of a star" the concept is token 5, as in SD.

## Training (our recipe, `trainers/toyworld/pretrain.py`)
{runs}

- seed {seed}; render pool of {pool} images (seeds 0..{pool_last});
- VAE: {vae_line}; scaling factor {sf:.4f};
- {trained}: {steps} steps in all, {batch}, {dropout:.0%} caption dropout, EMA {ema}; captions
  randomly drop the colour and the background phrase;
- UNet training time {train_min:.1f} min in all (each run's device above); the attention AUC is checked
  on 32 held-out renders (seeds 1,000,000,000+).

Attention AUC during training (early-stopping set; loss = plain epsilon MSE of the last interval):

| step | loss | AUC | minutes |
|---|---|---|---|
{history}

## Measured quality
`python -m trainers.toyworld.quality --model toyworld --n {n} --card` on {n} held-out renders with an object
(seeds {qseed}+, never used in training or early stopping). Probe: 40 least-noisy of 50 DDIM steps, prompt
"a photo of a {{concept}}", all attn2 layers. IoU pooled over pixels (per-image mean in brackets).

| measure | value |
|---|---|
| attention pixel AUC-ROC (instance-normalised) | {auc:.3f} |
| attention pixel AUC-ROC (raw) | {auc_raw:.3f} |
{auc_concept_row}| GMM-midpoint + 3x3 majority mask IoU | {gmm_iou:.3f} ({gmm_img:.3f}) |
| Otsu on grayscale IoU | {otsu_iou:.3f} ({otsu_img:.3f}) |
| GrabCut, centred box (10% margin) IoU | {gc_iou:.3f} ({gc_img:.3f}) |
{concept_rows}
![attention](attention.png)

Rows: held-out image, mean attention of the concept token, GMM mask, ground truth.

## Samples
"a photo of a {{concept}}", DDIM 50 steps, guidance 3, one row per concept:

![samples](samples.png)

{samples_note}

## Limits
64x64 images, six shapes, eight colours, five background textures; it knows nothing else. Words outside the
grammar tokenize into character pieces the model never learned.
"""


def training_runs(info: dict) -> list[dict]:
    """The chain of pretraining runs behind a model (oldest first), from training.json's `continued_from`."""
    runs = []
    while info:
        runs.append(info)
        info = info.get("continued_from")
    return runs[::-1]


def _run_line(i: int, run: dict, first_step: int) -> str:
    cfg = run.get("config") or {}
    weighting = {
        "eps": "plain epsilon MSE",
        "p2": "P2-weighted epsilon MSE",
        "v": f"epsilon MSE with v-prediction weights capped at {cfg.get('max_weight')}",
    }[cfg.get("loss_weighting", "eps")]
    if cfg.get("init_from"):
        start = f"from the previous model (`--init-from {cfg['init_from']}`, fresh optimizer)"
        if cfg.get("text_encoder_from"):
            start += f", its UNet under the text encoder of `--text-encoder-from {cfg['text_encoder_from']}`"
        if cfg.get("freeze_text_encoder"):
            start += ", text encoder frozen (UNet trained alone)"
    elif cfg.get("vae_from"):
        start = f"a new text encoder and UNet on the VAE of `--vae-from {cfg['vae_from']}`"
    else:
        start = "from scratch"
    cmds = "; ".join(f"`{c}`" for c in run.get("commands", [])) or "(command not recorded)"
    lr = (
        f"{cfg.get('lr')} cosine to 5% of it"
        if cfg.get("lr_schedule") == "cosine"
        else f"{cfg.get('lr')} constant"
    )
    return (
        f"{i}. {cmds}: UNet steps {first_step}-{run['steps'] + first_step}, {start}, "
        f"batch {cfg.get('batch')}, "
        f"AdamW {lr}, "
        f"{weighting}, {run['train_minutes']:.1f} min on {run.get('hardware', '2 CPU cores')}, "
        f"attention AUC checked every {cfg.get('eval_every')} steps."
    )


def write_card(model_dir: Path, res: dict, n: int, samples_note: str = "") -> None:
    info = json.loads((model_dir / "training.json").read_text())
    runs = training_runs(info)
    cfg = runs[0]["config"]
    comps = []
    for c in ("vae", "text_encoder", "unet"):
        conf = json.loads((model_dir / c / "config.json").read_text())
        size = sum(f.stat().st_size for f in (model_dir / c).glob("*.safetensors")) / 4  # fp32 params
        cls = conf.get("_class_name") or conf.get("architectures", ["?"])[0]
        comps.append(f"| {c} | {cls} | {size / 1e6:.2f}M params |")
    vae_conf = json.loads((model_dir / "vae" / "config.json").read_text())
    from transformers import CLIPTokenizer

    vocab = len(CLIPTokenizer.from_pretrained(model_dir / "tokenizer"))
    lines, hist, offset, minutes = [], [], 0, 0.0
    for i, run in enumerate(runs, 1):
        lines.append(_run_line(i, run, offset))
        hist += [
            f"| {h['step'] + offset} | {h['loss']:.4f} | {h['auc']:.3f} | {h['minutes'] + minutes:.1f} |"
            for h in run["history"]
        ]
        offset += run["steps"]
        minutes += run["train_minutes"]
    # absent from quality.json files written before it was measured
    auc_concept_row = (
        "| attention pixel AUC-ROC per concept | "
        + ", ".join(f"{c} {v:.3f}" for c, v in res["auc_per_concept"].items())
        + " |\n"
        if "auc_per_concept" in res
        else ""
    )
    concept_rows = "".join(
        f"| concept accuracy of samples, guidance {v['guidance']:g} (shape classifier; chance 0.167) "
        f"| {v['mean']:.3f} |\n"
        for k, v in sorted(res.items())
        if k.startswith("concept_accuracy")
    )
    if "caption_usage" in res:
        concept_rows += (
            "| epsilon MSE increase with a wrong shape word, t = "
            + " / ".join(str(t) for t in res["caption_usage"])
            + " | "
            + " / ".join(f"{100 * v:.1f}%" for v in res["caption_usage"].values())
            + " |\n"
        )
    if "classifier" in res:
        c = res["classifier"]
        concept_rows += (
            f"| shape classifier on held-out renders / their VAE reconstructions | "
            f"{c['test_accuracy']:.3f} / {c['vae_reconstruction_accuracy']:.3f} |\n"
        )
    vae_line = (
        f"taken unchanged from `{cfg['vae_from']}` (`--vae-from`), whose card gives its recipe"
        if cfg.get("vae_from")
        else f"{cfg['vae_steps']} steps, batch {cfg['vae_batch']}, AdamW "
        f"{cfg['vae_lr']} (cosine), MSE + 0.5 L1 + {cfg['kl_weight']} KL"
    )
    frozen = sum(1 for r in runs if (r.get("config") or {}).get("freeze_text_encoder"))
    trained = (
        "text encoder + UNet jointly"
        if not frozen
        else "UNet alone (text encoder frozen)"
        if frozen == len(runs)
        else f"text encoder + UNet jointly, the UNet alone in the {frozen} run(s) with the text encoder "
        "frozen"
    )
    batches = sorted({r["config"].get("batch") for r in runs if r.get("config")})
    batch = f"batch {batches[0]}" if len(batches) == 1 else "batch per run (above)"
    text = CARD.format(
        concepts=", ".join(CONCEPTS),
        path="factory/models/toyworld" if model_dir.name == "toyworld" else model_dir,
        components="\n".join(comps),
        vocab=vocab,
        max_tokens=16,
        runs="\n".join(lines),
        seed=cfg["seed"],
        pool=cfg["pool_size"],
        pool_last=cfg["pool_size"] - 1,
        vae_line=vae_line,
        sf=vae_conf["scaling_factor"],
        trained=trained,
        steps=offset,
        batch=batch,
        dropout=cfg["caption_dropout"],
        ema=cfg["ema_decay"],
        train_min=minutes,
        history="\n".join(hist),
        n=n,
        qseed=QUALITY_SEED_BASE,
        auc=res["auc"],
        auc_raw=res["auc_unnormalized"],
        gmm_iou=res["gmm"]["iou"],
        gmm_img=res["gmm"]["per_image_iou"],
        otsu_iou=res["otsu_gray"]["iou"],
        otsu_img=res["otsu_gray"]["per_image_iou"],
        gc_iou=res["grabcut"]["iou"],
        gc_img=res["grabcut"]["per_image_iou"],
        auc_concept_row=auc_concept_row,
        concept_rows=concept_rows,
        samples_note=samples_note,
    )
    (model_dir / "README.md").write_text(text)
    (model_dir / "quality.json").write_text(json.dumps(res, indent=2))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m trainers.toyworld.quality",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="toyworld")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--out", default=None, help="where figures go (default: the model directory)")
    p.add_argument("--no-grid", action="store_true")
    p.add_argument(
        "--concept-samples",
        type=int,
        default=50,
        help="samples per concept for the shape-classifier concept accuracy (0 skips it)",
    )
    p.add_argument(
        "--card", action="store_true", help="write README.md + quality.json into the model directory"
    )
    p.add_argument("--note", default="", help="a paragraph for the card's Samples section")
    a = p.parse_args(argv)
    model_dir = Path(resolve_model(a.model))
    res = evaluate(
        a.model,
        a.n,
        Path(a.out) if a.out else model_dir,
        grid=not a.no_grid,
        concept_samples=a.concept_samples,
    )
    print(json.dumps({k: v for k, v in res.items()}, indent=2))
    if a.card:
        write_card(model_dir, res, a.n, a.note)


if __name__ == "__main__":
    main()
