"""Student data (paper Step 6): triplet shards -> augmented (image, target) pairs.

One sample's path, top to bottom:
  1. a row of a `factory generate` or `factory label` shard (or of a ground-truth shard, `split_to_shards`)
  2. its target at image resolution: the refined mask `mask.png` (default), or M_pre `prelim.png`, or the soft
     mean attention `attn.npy` (min-max normalised); the latter two live on the canvas's latent grid and are
     cropped to the valid region and resized to the image -- `target_of`
  3. the paper's augmentation, joint: Resize(S) of the shorter side (bilinear; targets become soft at the
     edges and are used as they are), RandomCrop(S), RandomHorizontalFlip -- `augment_pair`
  4. the label: the target itself for a one-concept student; for a multi-class student the class index of
     the row's concept where the target is >= 0.5, else 0 (background)

Evaluation (`trainers.evaluate.score`) uses the same resize with a centre crop, as the paper's test step.
"""

from __future__ import annotations

import io
import json

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from factory.method.geometry import Canvas

TARGETS = ("refined", "prelim", "attention")
IMAGE_KEYS = ("jpg", "png", "jpeg")


def _decode(value, kind: str):
    """Ray Data's WebDataset reader decodes; raw bytes (webdataset without decoders) are decoded here."""
    if not isinstance(value, (bytes, bytearray)):
        return value
    if kind == "json":
        return json.loads(value)
    if kind == "npy":
        return np.load(io.BytesIO(value))
    return np.asarray(Image.open(io.BytesIO(value)))


def row_image(row: dict) -> np.ndarray:
    for k in IMAGE_KEYS:
        if row.get(k) is not None:
            img = np.asarray(_decode(row[k], "image"))
            return np.repeat(img[..., None], 3, 2) if img.ndim == 2 else img[..., :3]
    raise KeyError(f"shard sample {row.get('__key__')!r} has no image ({', '.join(IMAGE_KEYS)})")


def _latent_to_image(grid: np.ndarray, canvas: dict, h: int, w: int) -> np.ndarray:
    """A map on the canvas's latent grid -> the image's (h, w), via the valid region (bilinear)."""
    c = Canvas(**canvas)
    f = c.size / grid.shape[0]
    vh, vw = max(1, round(c.valid_h / f)), max(1, round(c.valid_w / f))
    valid = torch.from_numpy(np.ascontiguousarray(grid[:vh, :vw], np.float32))[None, None]
    return F.interpolate(valid, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()


def target_of(row: dict, source: str = "refined") -> np.ndarray:
    """The row's training target at image resolution, float32 in [0, 1]."""
    image = row_image(row)
    h, w = image.shape[:2]
    if source == "refined":
        return (np.asarray(_decode(row["mask.png"], "image")) > 127).astype(np.float32)
    meta = _decode(row["json"], "json")
    if source == "prelim":
        grid = (np.asarray(_decode(row["prelim.png"], "image")) > 127).astype(np.float32)
    elif source == "attention":
        a = np.asarray(_decode(row["attn.npy"], "npy"), np.float32)
        grid = (a - a.min()) / (np.ptp(a) + 1e-12)
    else:
        raise ValueError(f"unknown target {source!r}; choose one of {', '.join(TARGETS)}")
    return np.clip(_latent_to_image(grid, meta["canvas"], h, w), 0.0, 1.0)


def resize_shorter(x: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """(C, H, W) -> shorter side = size."""
    h, w = x.shape[-2:]
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    if (nh, nw) == (h, w):
        return x
    kw = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(x[None], size=(nh, nw), mode=mode, **kw)[0]


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size]


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) in [-1, 1], as the paper's U-Net input."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div(127.5).sub(1.0)


def augment_pair(image: np.ndarray, target: np.ndarray, size: int, rng: np.random.Generator):
    """Resize(size) of the shorter side, RandomCrop(size), RandomHorizontalFlip: image and target jointly."""
    stack = resize_shorter(
        torch.cat([to_tensor(image), torch.from_numpy(np.asarray(target, np.float32))[None]]), size
    )
    h, w = stack.shape[-2:]
    top, left = int(rng.integers(h - size + 1)), int(rng.integers(w - size + 1))
    stack = stack[:, top : top + size, left : left + size]
    if rng.random() < 0.5:
        stack = stack.flip(-1)
    return stack[:3].numpy(), stack[3].clamp(0, 1).numpy()


def center_pair(image: np.ndarray, target: np.ndarray, size: int):
    """The evaluation geometry: Resize(size) of the shorter side, CenterCrop(size)."""
    x = center_crop(resize_shorter(to_tensor(image), size), size)
    y = center_crop(resize_shorter(torch.from_numpy(np.asarray(target, np.float32))[None], size), size)[0]
    return x.numpy(), y.clamp(0, 1).numpy()


def to_student_examples(
    batch: dict,
    size: int,
    target: str = "refined",
    concepts: list[str] | None = None,
    classes: list[str] | None = None,
    augment: bool = True,
) -> dict:
    """Ray Data map_batches function: shard rows -> {"image": (B, 3, S, S), "target": (B, S, S)}.

    augment=True draws fresh random crops and flips on each call (each epoch anew); False centre-crops (for
    validation). `concepts` keeps only those concepts' rows; `classes` (multi-class) turns targets into
    class indices (0 = background, i + 1 = classes[i])."""
    rng = np.random.default_rng()
    keep = set(concepts or [])
    images, targets = [], []
    for i in range(len(batch["json"])):
        row = {k: v[i] for k, v in batch.items()}
        meta = _decode(row["json"], "json")
        if keep and meta.get("concept") not in keep:
            continue
        image, t = row_image(row), target_of(row, target)
        x, y = augment_pair(image, t, size, rng) if augment else center_pair(image, t, size)
        if classes is not None:
            y = np.where(y >= 0.5, classes.index(meta["concept"]) + 1, 0).astype(np.float32)
        images.append(x)
        targets.append(y)
    if not images:
        return {
            "image": np.zeros((0, 3, size, size), np.float32),
            "target": np.zeros((0, size, size), np.float32),
        }
    return {"image": np.stack(images).astype(np.float32), "target": np.stack(targets).astype(np.float32)}


def split_to_shards(split: str, uri: str, concept: str | None = None, samples_per_shard: int = 100) -> str:
    """A labelled split (images/, masks/, captions.jsonl) -> ground-truth shards (image, mask.png, json), so a
    supervised student reads the same format as the others. Returns the shards' folder URI."""
    from pathlib import Path

    from factory.dataset.shards import ShardStore, _png

    split_p = Path(split)
    rows = [
        json.loads(line) for line in (split_p / "captions.jsonl").read_text().splitlines() if line.strip()
    ]
    rows = [r for r in rows if r.get("concept") and (concept is None or r["concept"] == concept)]
    store = ShardStore(uri)
    store.ensure()
    for s in range(0, len(rows), samples_per_shard):
        samples = []
        for r in rows[s : s + samples_per_shard]:
            img = np.asarray(Image.open(split_p / "images" / r["file"]).convert("RGB"))
            gt = np.asarray(Image.open(split_p / "masks" / r["file"]).convert("L")) > 127
            key = f"{r['concept']}-{Path(r['file']).stem}"
            meta = {"key": key, "concept": r["concept"], "source": "ground truth", "file": r["file"]}
            samples.append(
                {
                    "__key__": key,
                    "png": _png(img),
                    "mask.png": _png(gt.astype(np.uint8) * 255),
                    "json": json.dumps(meta).encode(),
                }
            )
        store.write_shard(
            f"gt-{s // samples_per_shard:06d}", samples, {"written": len(samples), "rejected": {}}
        )
    return uri
