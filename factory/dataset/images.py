"""Reading the user's images as the user sees them (label mode).

`read_image(url, max_pixels, min_side)` returns an (H, W, 3) uint8 RGB array, or raises `ImageRejected`
with the reason the sample is counted under in the shard stats:

- EXIF orientation is applied (`ImageOps.exif_transpose`): a phone photo's mask matches the photo as shown;
- 16-bit and float images are scaled to 0..255 by their type's range (I;16: /257; float: 0..1 if it fits,
  else min-max), not clipped, as Pillow's `convert("RGB")` would do;
- CMYK goes to RGB by Pillow's conversion, palette images through their palette, grey is repeated, and alpha
  is composited over white (what a viewer shows), each explicitly;
- an image with more than `max_pixels` pixels is downscaled (aspect kept) to at most `max_pixels` before the
  model sees it, and written at that size: the mask always matches the written image. Beyond Pillow's
  decompression-bomb limit (`BOMB_FACTOR` x `max_pixels`) it is not decoded at all: `too_large`;
- an image whose shorter side is under `min_side` pixels (a few latent cells) is `too_small`;
- a file that is empty, truncated or not an image is `unreadable`.
"""

from __future__ import annotations

import warnings

import numpy as np

BOMB_FACTOR = 16  # decode at most this many times max_pixels (then downscale); more is refused unread


class ImageRejected(ValueError):
    """An input image that is not processed; `reason` is its key in the shard stats' `rejected` counts."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _to_rgb(im) -> np.ndarray:
    """Any Pillow mode -> (H, W, 3) uint8, explicitly per mode (see the module docstring)."""
    from PIL import Image

    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        a = np.asarray(im, dtype=np.uint16).astype(np.float32) / 257.0
        return np.repeat(a.round().astype(np.uint8)[..., None], 3, 2)
    if mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if mode == "F" and a.min() >= 0.0 and a.max() <= 1.0:
            a = a * 255.0
        elif mode == "I" and a.min() >= 0 and a.max() <= 65535:
            a = a / 257.0 if a.max() > 255 else a
        else:
            lo, hi = float(a.min()), float(a.max())
            a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        return np.repeat(np.clip(a, 0, 255).round().astype(np.uint8)[..., None], 3, 2)
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    if mode == "1" or mode == "L":
        return np.repeat(np.asarray(im.convert("L"))[..., None], 3, 2)
    return np.asarray(im.convert("RGB"))  # RGB, CMYK, YCbCr, LAB, HSV


def read_image(url: str, max_pixels: int, min_side: int) -> np.ndarray:
    """The image at any fsspec URL as the user sees it: (H, W, 3) uint8, at most `max_pixels` pixels.

    Raises:
        ImageRejected: with reason `unreadable`, `too_large` or `too_small`.
    """
    import io

    import fsspec
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with fsspec.open(url, "rb") as f:
            data = f.read()
    except (OSError, ValueError) as err:
        raise ImageRejected("unreadable", f"unreadable: {type(err).__name__}: {err}") from err
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > BOMB_FACTOR * max_pixels:
                raise ImageRejected(
                    "too_large",
                    f"too_large: {w}x{h} = {w * h / 1e6:.0f} MP, over {BOMB_FACTOR} x input.max_pixels "
                    f"({BOMB_FACTOR * max_pixels / 1e6:.0f} MP); it was not decoded",
                )
            if w * h > max_pixels and im.format == "JPEG":  # decode at a reduced size where JPEG can
                s = (max_pixels / (w * h)) ** 0.5
                im.draft("RGB", (max(1, int(w * s)), max(1, int(h * s))))
            im.load()
            im = ImageOps.exif_transpose(im)
    except ImageRejected:
        raise
    except (
        OSError,
        ValueError,
        SyntaxError,
        UnidentifiedImageError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as err:
        raise ImageRejected("unreadable", f"unreadable: {type(err).__name__}: {err}") from err
    w, h = im.size
    if w * h > max_pixels:
        s = (max_pixels / (w * h)) ** 0.5
        w, h = max(1, int(w * s)), max(1, int(h * s))
    if min(w, h) < min_side:
        raise ImageRejected(
            "too_small",
            f"too_small: {w}x{h}, the shorter side is under {min_side} px (a few latent cells of the model)",
        )
    if (w, h) == im.size:
        return _to_rgb(im)
    if im.mode in ("RGB", "L", "RGBA", "LA"):  # 8-bit modes that resize well: resize before converting
        return _to_rgb(im.resize((w, h), Image.LANCZOS, reducing_gap=3.0))
    return np.asarray(Image.fromarray(_to_rgb(im)).resize((w, h), Image.LANCZOS))
