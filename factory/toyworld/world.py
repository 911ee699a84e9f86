"""toyworld: a procedural world of shapes on cluttered textures, with exact ground-truth masks.

Every image is a pure function of its seed. One object (or, for ~10% of images, none) is drawn on a
procedural background; the object mask is exact (computed from the same anti-aliased coverage that is
used for compositing), and the caption is produced by a small grammar:

    "a photo of a red star on a striped background"
    "a photo of a striped background"                       (background-only images)

Colors overlap between objects and backgrounds on purpose, so that colour or Otsu thresholding does not
solve segmentation; the ring has a hole, to exercise hole handling downstream.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CONCEPTS: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "ring")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (210, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 210),
    "yellow": (230, 210, 40),
    "orange": (235, 130, 30),
    "purple": (140, 50, 170),
    "white": (235, 235, 235),
    "gray": (128, 128, 128),
}
BACKGROUNDS: tuple[str, ...] = ("noisy", "striped", "checkered", "gradient", "dotted")
BACKGROUND_ONLY_FRACTION = 0.10
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Sample:
    """One rendered toyworld image with its ground truth."""

    seed: int
    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) bool, True = object
    caption: str
    concept: str | None  # None for background-only images
    color: str | None
    background: str

    def meta(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("image", "mask")}


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int], amount: float) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) + rng.normal(0.0, amount, 3), 0, 255)


def _shape_polygons(concept: str, cx: float, cy: float, r: float, angle: float) -> list[list[tuple]]:
    """Outline polygons (in supersampled pixels) of a shape; the ring returns [outer, inner]."""

    def rot(points: np.ndarray) -> list[tuple]:
        c, s = math.cos(angle), math.sin(angle)
        x = cx + r * (points[:, 0] * c - points[:, 1] * s)
        y = cy + r * (points[:, 0] * s + points[:, 1] * c)
        return list(zip(x.tolist(), y.tolist(), strict=True))

    t = np.linspace(0, 2 * math.pi, 96, endpoint=False)
    circle = np.stack([np.cos(t), np.sin(t)], 1)
    if concept == "circle":
        return [rot(circle)]
    if concept == "ring":
        return [rot(circle), rot(circle * 0.55)]
    if concept == "square":
        a = np.array([0.25, 0.75, 1.25, 1.75]) * math.pi
        return [rot(np.stack([np.cos(a), np.sin(a)], 1))]
    if concept == "triangle":
        a = np.array([-0.5, 1 / 6, 5 / 6]) * math.pi
        pts = np.stack([np.cos(a), np.sin(a)], 1)
        return [rot(pts * 1.15 + np.array([0, 0.2]))]
    if concept == "star":
        a = -math.pi / 2 + np.arange(10) * math.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return [rot(np.stack([np.cos(a) * rad, np.sin(a) * rad], 1))]
    if concept == "heart":
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = np.stack([x, y], 1) / 16.0
        return [rot(pts + np.array([0, 0.1]))]
    raise ValueError(f"unknown toyworld concept {concept!r}; known: {', '.join(CONCEPTS)}")


def _coverage(concept: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Anti-aliased object coverage in [0, 1] at (size, size), from a supersampled polygon fill."""
    big = size * SUPERSAMPLE
    r = rng.uniform(0.16, 0.34) * size * SUPERSAMPLE
    margin = r * 0.8
    cx = rng.uniform(margin, big - margin)
    cy = rng.uniform(margin, big - margin)
    angle = rng.uniform(0, 2 * math.pi)
    polys = _shape_polygons(concept, cx, cy, r, angle)
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    draw.polygon(polys[0], fill=255)
    for hole in polys[1:]:
        draw.polygon(hole, fill=0)
    cov = np.asarray(canvas, np.float32).reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean((1, 3))
    return cov / 255.0


def _texture(
    kind: str, size: int, rng: np.random.Generator, base: np.ndarray, other: np.ndarray
) -> np.ndarray:
    """A (size, size, 3) float texture of the named kind mixing two colours."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if kind == "noisy":
        noise = rng.random((size // 4 + 1, size // 4 + 1)).astype(np.float32)
        noise = np.asarray(
            Image.fromarray((noise * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
        )
        w = noise[..., None] / 255.0
    elif kind == "striped":
        theta = rng.uniform(0, math.pi)
        period = rng.uniform(5, 12)
        phase = rng.uniform(0, period)
        u = xx * math.cos(theta) + yy * math.sin(theta) + phase
        w = ((u % period) < period / 2).astype(np.float32)[..., None]
    elif kind == "checkered":
        cell = rng.integers(5, 11)
        ox, oy = rng.integers(0, cell, 2)
        w = ((((xx + ox) // cell) + ((yy + oy) // cell)) % 2).astype(np.float32)[..., None]
    elif kind == "gradient":
        theta = rng.uniform(0, 2 * math.pi)
        u = (xx - size / 2) * math.cos(theta) + (yy - size / 2) * math.sin(theta)
        w = np.clip(u / size + 0.5, 0, 1)[..., None]
    elif kind == "dotted":
        w = np.zeros((size, size, 1), np.float32)
        for _ in range(int(rng.integers(6, 14))):
            bx, by = rng.uniform(0, size, 2)
            br = rng.uniform(1.5, 4.0)
            w[((xx - bx) ** 2 + (yy - by) ** 2) < br**2] = 1.0
    else:
        raise ValueError(f"unknown toyworld background {kind!r}; known: {', '.join(BACKGROUNDS)}")
    tex = base * (1 - w) + other * w
    return tex + rng.normal(0, 6.0, (size, size, 3)).astype(np.float32)


def render(
    seed: int, size: int = 64, concept: str | None = None, background_only: bool | None = None
) -> Sample:
    """Render the toyworld image of `seed`. `concept`/`background_only` force those choices (for
    class-balanced sets); everything else is drawn from the seed alone."""
    rng = np.random.default_rng(seed)
    if background_only is None:
        background_only = bool(rng.random() < BACKGROUND_ONLY_FRACTION)
    else:
        rng.random()  # keep the stream aligned with the unforced case
    color_names = list(COLORS)
    bg_kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    bg_a, bg_b = rng.choice(len(color_names), 2, replace=False)
    bg = _texture(
        bg_kind,
        size,
        rng,
        _jitter(rng, COLORS[color_names[bg_a]], 18),
        _jitter(rng, COLORS[color_names[bg_b]], 18),
    )
    picked = CONCEPTS[int(rng.integers(len(CONCEPTS)))]
    concept = picked if concept is None else concept
    if concept not in CONCEPTS:
        raise ValueError(f"unknown toyworld concept {concept!r}; known: {', '.join(CONCEPTS)}")
    color = color_names[int(rng.integers(len(color_names)))]
    if background_only:
        img = bg
        mask = np.zeros((size, size), bool)
        caption = f"a photo of a {bg_kind} background"
        concept_out, color_out = None, None
    else:
        cov = _coverage(concept, size, rng)
        main = _jitter(rng, COLORS[color], 12)
        second = main * rng.uniform(0.55, 0.85)
        fg_kind = ("noisy", "striped", "gradient")[int(rng.integers(3))]
        solid = rng.random() < 0.4
        fg = _texture(fg_kind, size, rng, main, main if solid else second)
        img = bg * (1 - cov[..., None]) + fg * cov[..., None]
        mask = cov >= 0.5
        caption = f"a photo of a {color} {concept} on a {bg_kind} background"
        concept_out, color_out = concept, color
    image = np.clip(img, 0, 255).round().astype(np.uint8)
    return Sample(seed, image, mask, caption, concept_out, color_out, bg_kind)


def caption_variants(sample: Sample, rng: np.random.Generator) -> str:
    """A caption for training: the full grammar caption, or a shorter one that omits the colour and/or
    the background phrase (so that "a photo of a {concept}" is in distribution)."""
    if sample.concept is None:
        return sample.caption
    words = ["a photo of a"]
    if rng.random() < 0.5:
        words.append(sample.color)
    words.append(sample.concept)
    if rng.random() < 0.5:
        words.append(f"on a {sample.background} background")
    return " ".join(words)


def iter_samples(seeds: range | list[int], size: int = 64, concept: str | None = None) -> Iterator[Sample]:
    """Renders of `seeds`; with `concept`, every image holds that concept (a one-concept data set, as the
    paper's: every image contains the object)."""
    for s in seeds:
        yield render(int(s), size, concept=concept, background_only=False if concept else None)


def vocabulary() -> list[str]:
    """Every word the caption grammar can produce (plus the paper's prompt words)."""
    words = {"a", "photo", "of", "on", "background"} | set(CONCEPTS) | set(COLORS) | set(BACKGROUNDS)
    return sorted(words)


def write_split(
    out_dir: str | Path, seeds: range | list[int], size: int = 64, concept: str | None = None
) -> Path:
    """Write a labelled split: images/{seed}.png, masks/{seed}.png (0/255), captions.jsonl. With `concept`,
    only images of that concept."""
    if concept is not None and concept not in CONCEPTS:
        raise ValueError(f"unknown toyworld concept {concept!r}; choose one of {', '.join(CONCEPTS)}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    with open(out / "captions.jsonl", "w") as f:
        for s in iter_samples(seeds, size, concept):
            name = f"{s.seed:08d}.png"
            Image.fromarray(s.image).save(out / "images" / name)
            Image.fromarray(s.mask.astype(np.uint8) * 255).save(out / "masks" / name)
            f.write(json.dumps({"file": name, **s.meta()}) + "\n")
    return out
