"""Fine-tuning data (paper Step 3): label-mode shards -> augmented (image, prompt, loss mask) examples.

One sample's path, top to bottom:
  1. a row of a `factory label` shard: the image, its preliminary mask M_pre (latent grid, canvas
     coordinates) and its metadata (concept, prompt, canvas geometry) -- `aligned_pair`
  2. both in one geometry: the image on the model's canvas, M_pre upsampled nearest to pixels, both cropped to
     the valid region
  3. the paper's joint augmentation of image and mask: Resize(S) of the shorter side (bicubic, the mask as a
     4th channel), RandomCrop(S), RandomHorizontalFlip, clamp to [-1, 1]; the mask comes back to the latent
     grid by an f x f mean, rounded -- `augment`
  4. the task, per sample: with probability p_full, "a photo of a {concept}" with an all-ones loss mask;
     otherwise "a photo of a background" with the background cells of a random rectangle
     (`trainers.finetune.rectangles`) -- `make_example`

Steps 1-4 run in Ray Data tasks (`to_examples`) that stream into the Ray Train workers, so the data set is
never loaded whole and the random choices are drawn anew every epoch.

Departure from the reference code: it clamps only the full-image branch to [-1, 1] (the background branch
keeps the bicubic overshoot); we clamp both.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from factory.dataset.shards import sample_image
from factory.method.geometry import Canvas, crop_valid, resize_mask, to_canvas
from trainers.finetune.rectangles import RectangleRules, background_rectangle


def aligned_pair(image: np.ndarray, prelim: np.ndarray, canvas: dict) -> tuple[np.ndarray, np.ndarray]:
    """A label shard's image (original size) and M_pre (latent grid of the canvas) -> the valid region of
    the canvas, (h, w, 3) uint8, and M_pre upsampled to its pixels, (h, w) bool."""
    c = Canvas(**canvas)
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, 2)
    placed, _ = to_canvas(img[..., :3].astype(np.uint8), c.size)
    mask = resize_mask(
        np.asarray(prelim) > 127 if np.asarray(prelim).dtype == np.uint8 else np.asarray(prelim, bool),
        c.size,
        c.size,
    )
    return crop_valid(placed, c), crop_valid(mask, c)


def augment(
    image: np.ndarray, mask: np.ndarray, resolution: int, vae_factor: int, rng: np.random.Generator
) -> tuple[torch.Tensor, np.ndarray]:
    """The paper's joint augmentation. Returns the image (3, S, S) in [-1, 1] and the mask on the latent
    grid (S/f, S/f) bool."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div(127.5).sub(1.0)
    m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None]
    stack = torch.cat([x, m])[None]
    h, w = stack.shape[-2:]
    scale = resolution / min(h, w)
    nh, nw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
    if (nh, nw) != (h, w):
        stack = F.interpolate(stack, size=(nh, nw), mode="bicubic", align_corners=False)
    top = int(rng.integers(nh - resolution + 1))
    left = int(rng.integers(nw - resolution + 1))
    stack = stack[0, :, top : top + resolution, left : left + resolution]
    if rng.random() < 0.5:
        stack = stack.flip(-1)
    image_t = stack[:3].clamp(-1.0, 1.0)
    mask_lat = F.avg_pool2d(stack[3:4][None], vae_factor)[0, 0].round().clamp(0, 1).bool().numpy()
    return image_t, mask_lat


def make_example(
    image: np.ndarray,
    mask: np.ndarray,
    concept_prompt: str,
    background_prompt: str,
    resolution: int,
    vae_factor: int,
    rng: np.random.Generator,
    p_full: float = 0.5,
    rules: RectangleRules | None = None,
) -> dict:
    """One training example: {"pixel_values": (3, S, S), "loss_mask": (S/f, S/f) float32, "prompt": str,
    "task": "full" | "background"}."""
    pixels, fg = augment(image, mask, resolution, vae_factor, rng)
    if rng.random() < p_full:
        return {
            "pixel_values": pixels.numpy(),
            "loss_mask": np.ones(fg.shape, np.float32),
            "prompt": concept_prompt,
            "task": "full",
        }
    rect = background_rectangle(fg, rng, rules or RectangleRules.for_grid(fg.shape[0]))
    return {
        "pixel_values": pixels.numpy(),
        "loss_mask": rect.astype(np.float32),
        "prompt": background_prompt,
        "task": "background",
    }


def to_examples(
    batch: dict,
    resolution: int,
    vae_factor: int,
    background_prompt: str,
    p_full: float,
    concepts: list[str] | None = None,
) -> dict:
    """Ray Data map_batches function: decoded label-shard rows -> training examples.

    Its randomness is fresh on every call, so every epoch draws new crops, flips, tasks and rectangles."""
    rng = np.random.default_rng()
    keep = set(concepts or [])
    lat = resolution // vae_factor
    out = {"pixel_values": [], "loss_mask": [], "prompt": [], "task": []}
    for i in range(len(batch["json"])):
        row = {k: v[i] for k, v in batch.items()}
        meta = row["json"]
        if keep and meta["concept"] not in keep:
            continue
        if row.get("prelim.png") is None:
            raise KeyError(
                f"shard sample {row.get('__key__')!r} has no prelim.png: fine-tuning reads the "
                "shards of a `factory label` job"
            )
        image, mask = aligned_pair(sample_image(row), row["prelim.png"], meta["canvas"])
        ex = make_example(image, mask, meta["prompt"], background_prompt, resolution, vae_factor, rng, p_full)
        for k in out:
            out[k].append(ex[k])
    n = len(out["prompt"])
    return {
        "pixel_values": np.stack(out["pixel_values"])
        if n
        else np.zeros((0, 3, resolution, resolution), np.float32),
        "loss_mask": np.stack(out["loss_mask"]) if n else np.zeros((0, lat, lat), np.float32),
        "prompt": np.array(out["prompt"], dtype=object),
        "task": np.array(out["task"], dtype=object),
    }
