"""Paper Step 4b: the refined mask from the difference between an image and its inpainted background.

    d = mean_RGB |x - x_bg|            (pixels in [0, 1], canvas resolution, valid region only)
    diff_mask = rule(d) + 3x3 majority (the same mask rule as Step 2)
    M = upsample(M_pre) AND diff_mask  (nearest upsampling: the strict variant; see method.md Step 4b)

Optionally M is closed and its holes filled (the paper's code computes this but its metrics do not use it,
so it is off by default; note that hole filling also fills the ring's real hole).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from factory.method.geometry import Canvas, crop_valid, resize_mask
from factory.method.masks import MaskStats, binarize


def refine_mask(
    image: np.ndarray,
    background: np.ndarray,
    prelim: np.ndarray,
    canvas: Canvas,
    rule: str = "gmm",
    close_and_fill: bool = False,
) -> tuple[np.ndarray, np.ndarray, MaskStats]:
    """image, background: (S, S, 3) uint8 canvases; prelim: (h, w) bool at latent resolution.

    Returns the refined mask (S, S) bool, the difference map (S, S) float32 and the rule's stats."""
    if image.shape != background.shape:
        raise ValueError(f"image {image.shape} and background {background.shape} differ in shape")
    diff = np.abs(image.astype(np.float32) - background.astype(np.float32)).mean(-1) / 255.0
    valid = crop_valid(diff, canvas)
    diff_mask_valid, stats = binarize(valid, rule)
    diff_mask = np.zeros(diff.shape, bool)
    diff_mask[: canvas.valid_h, : canvas.valid_w] = diff_mask_valid
    prelim_up = resize_mask(prelim, *diff.shape)
    mask = prelim_up & diff_mask
    if close_and_fill:
        mask = ndimage.binary_fill_holes(ndimage.binary_closing(mask, iterations=1))
    return mask, diff, stats
