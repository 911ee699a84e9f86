"""Writes the bad-input image corpus (tests/corpus/images/) and prints its manifest; run it to regenerate.

    python tests/corpus/make_images.py

Every file is small (the corpus tests run with `input.max_pixels: 4096`, so "huge" means 100 x 100 here,
and "a bomb" 300 x 300) and deterministic. `cases.yaml` beside it holds each file's expected outcome.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

OUT = Path(__file__).with_name("images")


def _shape(size: int = 48) -> np.ndarray:
    """A white disc on a grey-blue ramp: something whose orientation and colours a test can check."""
    yy, xx = np.mgrid[:size, :size]
    img = np.zeros((size, size, 3), np.uint8)
    img[..., 0] = 40 + (xx * 120 // size)
    img[..., 1] = 60
    img[..., 2] = 160
    disc = (yy - size // 3) ** 2 + (xx - size // 2) ** 2 < (size // 5) ** 2
    img[disc] = 255
    return img


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for p in OUT.iterdir():
        p.unlink()
    rgb = _shape()
    Image.fromarray(rgb).save(OUT / "good.png")
    Image.fromarray(rgb).save(OUT / "good.jpg", quality=95)
    (OUT / "zero-byte.jpg").write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    (OUT / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (OUT / "text-named.jpg").write_text("this is not an image\n")
    Image.fromarray(rgb).convert("CMYK").save(OUT / "cmyk.jpg", quality=95)
    grey16 = (np.linspace(0, 65535, 48 * 48).reshape(48, 48)).astype(np.uint16)
    Image.fromarray(grey16).save(OUT / "grey-16bit.png")
    Image.fromarray(rgb).convert("L").save(OUT / "grey.png")
    rgba = np.concatenate([rgb, np.full((48, 48, 1), 128, np.uint8)], -1)
    rgba[:, :24, 3] = 0
    Image.fromarray(rgba).save(OUT / "rgba.png")
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=16).save(OUT / "palette.png")
    Image.fromarray(rgb[:1, :1]).save(OUT / "one-pixel.png")
    Image.fromarray(np.repeat(rgb[:, :1], 400, 1)[:2]).save(OUT / "thin-2x400.png")
    Image.fromarray(rgb).save(OUT / "webp.webp", quality=90)
    Image.fromarray(np.tile(rgb, (3, 3, 1))[:100, :100]).save(OUT / "huge-100x100.png")
    Image.fromarray(np.tile(rgb, (7, 7, 1))[:300, :300]).save(OUT / "bomb-300x300.png")
    # a phone photo: upright it is 48 high and 64 wide; the camera stored it turned (64 x 48) with EXIF
    # orientation 6, "rotate 90 degrees clockwise to show"
    stored = np.rot90(_shape(64)[:48], k=1).copy()  # what the camera wrote
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(OUT / "exif-rotated.jpg", quality=95, exif=exif.tobytes())
    grey_f = np.linspace(0.0, 1.0, 48 * 48, dtype=np.float32).reshape(48, 48)
    Image.fromarray(grey_f, mode="F").save(OUT / "float.tiff")
    # hostile names: the sample key must stay a plain name
    Image.fromarray(rgb).save(OUT / "with space é.png")
    Image.fromarray(rgb).save(OUT / "..dots..png")
    for p in sorted(OUT.iterdir()):
        print(f"{p.name}: {p.stat().st_size} bytes")


if __name__ == "__main__":
    main()
