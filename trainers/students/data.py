"""Student data (paper Step 6): triplet shards -> augmented (image, target) pairs.

One sample's path, top to bottom:
  1. a row of a `factory generate` or `factory label` shard (or of a ground-truth shard, `split_to_shards`)
  2. its target at image resolution: the refined mask `mask.png` (default), or M_pre `prelim.png`, or the soft
     mean attention `attn.npy` (min-max normalised); the latter two live on the canvas's latent grid and are
     cropped to the valid region and resized to the image -- `target_of`
  3. Resize(S) of the shorter side, image and target jointly (bilinear; targets become soft at the edges and
     are used as they are), kept as one uint8 (4, h, w) stack -- `prepare_stack`; a training run does steps
     1-3 once per row (`prepare_rows`), and by default its workers keep the stacks for every epoch
  4. every epoch anew: RandomCrop(S), RandomHorizontalFlip (the paper's augmentation, `augment: paper`), and
     with `augment: colour` also a vertical flip, a random permutation of the colour channels, a colour
     inversion and brightness/contrast jitter -- `crop_and_augment` (our addition, see docs/students.md)
  5. the label: the target itself for a one-concept student; for a multi-class student the class index of
     the row's concept where the target is >= 0.5, else 0 (background)

`augment_pair` is steps 3-4 for one (image, target); evaluation (`trainers.evaluate.score`, `center_pair`)
uses the same resize with a centre crop, as the paper's test step.
"""

from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from factory.dataset.shards import decode_member, sample_image, sample_meta
from factory.method.geometry import Canvas

TARGETS = ("refined", "prelim", "attention")


def _latent_to_image(grid: np.ndarray, canvas: dict, h: int, w: int) -> np.ndarray:
    """A map on the canvas's latent grid -> the image's (h, w), via the valid region (bilinear)."""
    c = Canvas(**canvas)
    vh, vw = c.latent_valid(c.size // grid.shape[0])  # partially covered cells count, as the factory's M_pre
    valid = torch.from_numpy(np.ascontiguousarray(grid[:vh, :vw], np.float32))[None, None]
    return F.interpolate(valid, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()


def target_of(row: dict, source: str = "refined") -> np.ndarray:
    """The row's training target at image resolution, float32 in [0, 1]."""
    image = sample_image(row)
    h, w = image.shape[:2]
    if source == "refined":
        return (np.asarray(decode_member("mask.png", row["mask.png"])) > 127).astype(np.float32)
    meta = sample_meta(row)
    if source == "prelim":
        grid = (np.asarray(decode_member("prelim.png", row["prelim.png"])) > 127).astype(np.float32)
    elif source == "attention":
        a = np.asarray(decode_member("attn.npy", row["attn.npy"]), np.float32)
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


AUGMENTS = ("paper", "colour")


def prepare_stack(image: np.ndarray, target: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 image + (H, W) target in [0, 1] -> one (4, h, w) uint8 stack, shorter side = size
    (bilinear, jointly): the deterministic half of the paper's augmentation, done once per row."""
    stack = torch.cat(
        [
            torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1),
            255.0 * torch.from_numpy(np.asarray(target, np.float32))[None],
        ]
    )
    return resize_shorter(stack, size).round().clamp(0, 255).to(torch.uint8).numpy()


def _unpack(stack: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A (4, h, w) uint8 stack -> (image (3, h, w) in [-1, 1], target (h, w) in [0, 1]), float32."""
    return stack[:3].astype(np.float32) / 127.5 - 1.0, stack[3].astype(np.float32) / 255.0


def crop_and_augment(stack: np.ndarray, size: int, rng: np.random.Generator, augment: str = "paper"):
    """A prepared (4, h, w) stack -> (image (3, S, S) in [-1, 1], target (S, S) in [0, 1]).

    paper: RandomCrop(S) + RandomHorizontalFlip. colour: also RandomVerticalFlip, one of the 6 orders of the
    colour channels, inversion (p 0.5), contrast x U(0.7, 1.3) and brightness + U(-0.2, 0.2) -- shape, not
    colour, is what tells an object from its background, and a few hundred images cannot show every colour
    pairing (measured: docs/students.md)."""
    if augment not in AUGMENTS:
        raise ValueError(f"unknown augment {augment!r}; choose one of {', '.join(AUGMENTS)}")
    h, w = stack.shape[-2:]
    top, left = int(rng.integers(h - size + 1)), int(rng.integers(w - size + 1))
    crop = stack[:, top : top + size, left : left + size]
    if rng.random() < 0.5:
        crop = crop[:, :, ::-1]
    x, y = _unpack(crop)
    if augment == "colour":
        if rng.random() < 0.5:
            x, y = x[:, ::-1], y[::-1]
        x = x[rng.permutation(3)]
        if rng.random() < 0.5:
            x = -x
        x = np.clip(x * rng.uniform(0.7, 1.3) + rng.uniform(-0.2, 0.2), -1.0, 1.0)
    return np.ascontiguousarray(x, np.float32), np.ascontiguousarray(y, np.float32)


def augment_pair(
    image: np.ndarray, target: np.ndarray, size: int, rng: np.random.Generator, augment: str = "paper"
):
    """One training pair: Resize(size) of the shorter side, then `crop_and_augment`."""
    return crop_and_augment(prepare_stack(image, target, size), size, rng, augment)


def center_pair(image: np.ndarray, target: np.ndarray, size: int):
    """The evaluation geometry: Resize(size) of the shorter side, CenterCrop(size)."""
    x = center_crop(resize_shorter(to_tensor(image), size), size)
    y = center_crop(resize_shorter(torch.from_numpy(np.asarray(target, np.float32))[None], size), size)[0]
    return x.numpy(), y.clamp(0, 1).numpy()


def prepare_rows(
    batch: dict,
    size: int,
    target: str = "refined",
    concepts: list[str] | None = None,
    classes: list[str] | None = None,
) -> dict:
    """Ray Data map_batches function, once per run: shard rows -> {"stack": (4, h, w) uint8 (`prepare_stack`),
    "label": the class index (multi-class: i + 1 = classes[i]; one-concept students: 1)}. `concepts` keeps
    only those concepts' rows. Stacks of images with other aspect ratios differ in shape (a ragged column)."""
    keep = set(concepts or [])
    stacks, labels = [], []
    for i in range(len(batch["json"])):
        row = {k: v[i] for k, v in batch.items()}
        meta = sample_meta(row)
        if keep and meta.get("concept") not in keep:
            continue
        stacks.append(prepare_stack(sample_image(row), target_of(row, target), size))
        labels.append(classes.index(meta["concept"]) + 1 if classes is not None else 1)
    if not stacks:
        return {"stack": np.zeros((0, 4, size, size), np.uint8), "label": np.zeros(0, np.int64)}
    same = len({s.shape for s in stacks}) == 1
    column = np.stack(stacks) if same else np.array(stacks + [None], dtype=object)[:-1]
    return {"stack": column, "label": np.asarray(labels, np.int64)}


def to_student_examples(
    batch: dict,
    size: int,
    augment: str | None = "paper",
    multiclass: bool = False,
    rng: np.random.Generator | None = None,
) -> dict:
    """Ray Data map_batches function on prepared rows: -> {"image": (B, 3, S, S), "target": (B, S, S)}.

    With `augment` (paper | colour) it draws fresh random crops and flips on each call (each epoch anew);
    None centre-crops (for validation). `multiclass` turns targets into class indices (0 = background).
    `rng`: the random draws (default: fresh ones from the OS)."""
    rng = rng if rng is not None else np.random.default_rng()
    images, targets = [], []
    for stack, label in zip(batch["stack"], batch["label"], strict=True):
        if augment is None:
            # a copy: rows that come from Ray's object store are read-only
            x, y = _unpack(center_crop(torch.from_numpy(np.array(stack)), size).numpy())
        else:
            x, y = crop_and_augment(np.asarray(stack), size, rng, augment)
        if multiclass:
            y = np.where(y >= 0.5, label, 0).astype(np.float32)
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
