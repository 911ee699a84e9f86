"""One image geometry for every step: resize the long side to the model's resolution, pad right/bottom.

The paper's code places unresized images top-left on a 512 canvas for attention but resizes them to a
long side of 512 for inpainting, so its masks are misaligned by 512/long_side (method.md section 8, item 8).
We use a single geometry everywhere instead: every image is resized (up or down) so that its long side
equals the model resolution, padded with black on the right and bottom, and the valid region is recorded.
Masks are mapped back to the original size from the valid region alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Canvas:
    size: int  # side of the square canvas, in pixels
    valid_h: int  # the image occupies canvas[:valid_h, :valid_w]
    valid_w: int
    orig_h: int
    orig_w: int

    def latent_valid(self, factor: int) -> tuple[int, int]:
        """The valid region on a latent grid `factor` times smaller (partially covered cells count)."""
        return -(-self.valid_h // factor), -(-self.valid_w // factor)

    def as_dict(self) -> dict:
        return asdict(self)


def to_canvas(image: np.ndarray, size: int) -> tuple[np.ndarray, Canvas]:
    """(H, W, 3) uint8 -> (size, size, 3) uint8 canvas and its geometry."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, 2)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {img.shape}")
    img = img[..., :3]
    if img.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {img.dtype}")
    h, w = img.shape[:2]
    if min(h, w) < 1:
        raise ValueError(f"empty image of shape {img.shape}")
    scale = size / max(h, w)
    vh, vw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = img if (vh, vw) == (h, w) else np.asarray(Image.fromarray(img).resize((vw, vh), Image.BICUBIC))
    canvas = np.zeros((size, size, 3), np.uint8)
    canvas[:vh, :vw] = resized
    return canvas, Canvas(size, vh, vw, h, w)


def crop_valid(array: np.ndarray, canvas: Canvas) -> np.ndarray:
    """The valid region of a canvas-resolution array."""
    return array[: canvas.valid_h, : canvas.valid_w]


def resize_mask(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    """Nearest-neighbour resize of a boolean mask."""
    m = np.asarray(mask, bool)
    if m.shape == (h, w):
        return m.copy()
    return np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 127


def to_original(mask: np.ndarray, canvas: Canvas) -> np.ndarray:
    """A canvas-resolution mask mapped back to the original image size."""
    return resize_mask(crop_valid(mask, canvas), canvas.orig_h, canvas.orig_w)
