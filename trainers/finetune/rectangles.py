"""Paper Step 3's background rectangles: where the masked "a photo of a background" loss is applied.

On the latent grid (after augmentation), with fg = the preliminary mask (True = object):

    if fg covers all but at most one cell: return an empty mask (the sample contributes zero loss)
    up to `tries` times:
        pick two random background cells as opposite corners; width = |d row|, height = |d col|
        reject if width <= min_side or height <= min_side or width * height < min_area   (too small)
        reject if (width > max_side and height > max_side) or width * height > max_area (too large)
        reject if background cells in the box / (width * height) < 2/3                   (too much object)
        accept: loss mask = the background cells inside the box (corners included)
    after `tries` rejections: loss mask = every background cell

This follows the reference code (`GMMMaskSuggestor.get_rectangular_inpainting_mask`, method.md Step 3),
including its quirks: the box spans the corner cells inclusively ((width+1) x (height+1) cells) while the
limits and the background fraction use width * height.

The paper's limits (10, 16^2, 32, 32^2) are in cells of SD's 64x64 latent grid. `RectangleRules.for_grid`
scales them with the grid side (sides linearly, areas quadratically), so they are the paper's exactly at 64
and keep the same fractions of the image on smaller grids, such as toyworld's 16x16 (a departure from the
paper, which only ran at 64).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAPER_GRID = 64


@dataclass(frozen=True)
class RectangleRules:
    min_side: float = 10.0
    min_area: float = 16.0**2
    max_side: float = 32.0
    max_area: float = 32.0**2
    min_background: float = 2.0 / 3.0
    tries: int = 100

    @classmethod
    def for_grid(cls, side: int, tries: int = 100) -> RectangleRules:
        s = side / PAPER_GRID
        p = cls()
        return cls(
            p.min_side * s, p.min_area * s * s, p.max_side * s, p.max_area * s * s, p.min_background, tries
        )


def background_rectangle(
    foreground: np.ndarray, rng: np.random.Generator, rules: RectangleRules | None = None
) -> np.ndarray:
    """The loss mask (bool, same shape) of one random background rectangle of a (h, w) foreground mask."""
    fg = np.asarray(foreground, bool)
    if fg.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {fg.shape}")
    rules = rules or RectangleRules.for_grid(min(fg.shape))
    if fg.sum() >= fg.size - 1:
        return np.zeros_like(fg)
    rows, cols = np.nonzero(~fg)
    for _ in range(rules.tries):
        a, b = rng.integers(len(rows), size=2)
        r0, r1 = sorted((int(rows[a]), int(rows[b])))
        c0, c1 = sorted((int(cols[a]), int(cols[b])))
        width, height = r1 - r0, c1 - c0
        area = width * height
        if width <= rules.min_side or height <= rules.min_side or area < rules.min_area:
            continue
        if (width > rules.max_side and height > rules.max_side) or area > rules.max_area:
            continue
        box = np.zeros_like(fg)
        box[r0 : r1 + 1, c0 : c1 + 1] = True
        inside = box & ~fg
        if inside.sum() / area < rules.min_background:
            continue
        return inside
    return ~fg
