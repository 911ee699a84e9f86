"""Edge-aware refinement of a mask at pixel resolution (an option beyond the paper).

The paper upsamples M_pre by pixel replication, so every edge of the refined mask that M_pre cuts is an edge
of the latent grid (8 px in SD, 4 px in toyworld). `snap_to_edges` moves a binary mask's edges onto the
image's own: the mask as 0/1 (bilinear-upsampled first if it is on a coarser grid), filtered with He et al.'s
guided filter (ECCV 2010; OpenCV's maintained implementation, `cv2.ximgproc.guidedFilter`) with the image as
the guide, thresholded at 0.5. Inside a window of `radius` pixels the output is a linear function of the
guide's colours, so a soft boundary snaps to the colour edge that the object draws; `eps` sets how strong an
edge must be to be followed (larger: smoother).

`masks.edges: guided` (our default) applies it to the refined mask M, measured on the toyworld development
split in docs/method.md; `masks.edges: none` is the paper's.
"""

from __future__ import annotations

import numpy as np

from factory.errors import UserError
from factory.registry import Registry


class EdgesUnavailable(UserError, ImportError):
    """An edge mode whose implementation this machine's packages lack (OpenCV without its contrib modules)."""


def _ximgproc():
    import cv2

    if not hasattr(cv2, "ximgproc"):
        raise EdgesUnavailable(
            "masks.edges: guided needs OpenCV's contrib modules (cv2.ximgproc), which this Python's OpenCV "
            f"({cv2.__version__}) lacks, as GPU images that ship opencv-python-headless do: install "
            "opencv-contrib-python-headless in its place (pip uninstall -y opencv-python-headless && pip "
            "install opencv-contrib-python-headless), or set masks.edges: none (the paper's rule)"
        )
    return cv2.ximgproc


def bilinear_upsample(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """(h, w) map -> (height, width) float32, bilinear (half-pixel centres, as F.interpolate)."""
    import torch  # here: a job YAML's validation needs EDGES' names alone
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(values, np.float32))[None, None]
    return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)[0, 0].numpy()


def guided_filter(src: np.ndarray, image: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """He et al.'s guided filter of `src` ((H, W) float) with the (H, W, 3) uint8 `image` as the guide."""
    if image.ndim != 3 or image.shape[2] != 3 or src.shape != image.shape[:2]:
        raise ValueError(f"guide {image.shape} must be (H, W, 3) with src's (H, W) = {src.shape}")
    if radius < 1 or eps <= 0:
        raise ValueError(f"the guided filter needs radius >= 1 and eps > 0, got {radius} and {eps}")
    guide = np.ascontiguousarray(image, np.float32) / 255.0
    out = _ximgproc().guidedFilter(guide, np.ascontiguousarray(src, np.float32), int(radius), float(eps))
    return np.asarray(out, np.float32)


def snap_to_edges(mask: np.ndarray, image: np.ndarray, radius: int, eps: float = 1e-2) -> np.ndarray:
    """A binary mask (any resolution) -> the image's (H, W), its edges moved onto the image's: the guided
    filter of the mask as 0/1, thresholded at 0.5. A mask that is all one value stays so."""
    m = np.asarray(mask, bool)
    h, w = image.shape[:2]
    if not m.any() or m.all():
        return np.full((h, w), bool(m.any()))
    src = m.astype(np.float32) if m.shape == (h, w) else bilinear_upsample(m.astype(np.float32), h, w)
    return guided_filter(src, image, radius, eps) >= 0.5


def keep_edges(mask: np.ndarray, image: np.ndarray, radius: int, eps: float) -> None:
    """The paper's rule: no snap (None: the refined mask keeps the latent grid's edges)."""
    return None


# The edge modes of Step 4b (`masks.edges`): (mask, image, radius, eps) -> the snapped mask, or None for no
# snap. A new mode is one registration here; the config's choices follow.
EDGES: Registry = Registry("edge mode")
EDGES.register("none", keep_edges)
EDGES.register("guided", snap_to_edges)
EdgeMode = EDGES.literal()  # a config field's type: one of the registered modes


def check_edges_available(mode: str) -> None:
    """Raise `EdgesUnavailable` where `mode` cannot run on this machine: checked when a Distiller is built
    and in a job's preflight, before any model loads, not when the first refined mask is made (the first H200
    run met an image's OpenCV without contrib only at Step 4b, after the GPU had generated a batch)."""
    if EDGES[mode] is snap_to_edges:
        _ximgproc()
