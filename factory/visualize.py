"""Pictures of results: contact sheets of image | attention | masks | ... rows."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def heatmap(values: np.ndarray) -> np.ndarray:
    """Min-max normalised map -> (H, W, 3) uint8 with a perceptual (viridis-like) colormap."""
    import cv2

    v = np.asarray(values, np.float32)
    v = (v - v.min()) / (np.ptp(v) + 1e-12)
    return cv2.applyColorMap((v * 255).astype(np.uint8), cv2.COLORMAP_VIRIDIS)[..., ::-1].copy()


def as_rgb(tile: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Any tile (bool mask, float map, gray, RGB, RGBA) -> (h, w, 3) uint8 at `size` (nearest)."""
    t = np.asarray(tile)
    if t.dtype == bool:
        t = np.repeat((t[..., None] * 255).astype(np.uint8), 3, 2)
    elif t.ndim == 2 and t.dtype != np.uint8:
        t = heatmap(t)
    elif t.ndim == 2:
        t = np.repeat(t[..., None], 3, 2)
    elif t.shape[2] == 4:  # RGBA over a checkerboard
        yy, xx = np.mgrid[: t.shape[0], : t.shape[1]]
        checker = np.where(((yy // 4 + xx // 4) % 2)[..., None] == 0, 200, 140).astype(np.float32)
        a = t[..., 3:4].astype(np.float32) / 255
        t = (t[..., :3] * a + checker * (1 - a)).astype(np.uint8)
    if t.shape[:2] != size:
        t = np.asarray(Image.fromarray(t).resize((size[1], size[0]), Image.NEAREST))
    return t


def contact_sheet(rows: list[list[np.ndarray]], columns: list[str], tile: int = 128,
                  row_labels: list[str] | None = None) -> Image.Image:
    """A grid image: one row per sample, one labelled column per stage."""
    pad, head = 4, 18
    left = 0 if row_labels is None else 150
    w = left + len(columns) * (tile + pad) + pad
    h = head + len(rows) * (tile + pad) + pad
    sheet = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(sheet)
    for j, name in enumerate(columns):
        draw.text((left + pad + j * (tile + pad), 3), name, fill="black")
    for i, row in enumerate(rows):
        y = head + i * (tile + pad)
        if row_labels is not None:
            draw.text((4, y + tile // 2 - 6), row_labels[i][:24], fill="black")
        for j, t in enumerate(row):
            sheet.paste(Image.fromarray(as_rgb(t, (tile, tile))), (left + pad + j * (tile + pad), y))
    return sheet
