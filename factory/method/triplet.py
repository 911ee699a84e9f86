"""A sample's two records: its `Draft` after the model calls (Steps 1-4) and its finished `Triplet`.

`Draft.finish()` is Steps 5-6 of a sample's path (`factory.method.distiller` lists them all): the refined mask
(paper Step 4b, `factory.method.refine`) and the triplet in the image's own size. It is CPU work only, so a
Ray job runs it in its CPU writer tasks while the GPU actor goes on with the next batch; this module needs
no model library, only numpy, OpenCV and torch's interpolation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from factory.method.geometry import Canvas, crop_valid, resize_mask
from factory.method.refine import refine_mask


@dataclass
class Triplet:
    """One labelled sample, as the shards store it (`{key}.jpg|png`, `.mask.png`, `.prelim.png`, `.attn.npy`,
    `.fg.png`, `.bg.jpg|png`, `.json`). Arrays are in the image's own size, except `prelim` and `attention`,
    which are on the latent grid of the model's canvas."""

    key: str
    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) bool, refined
    prelim: np.ndarray  # (h, w) bool, latent resolution, canvas coordinates
    attention: np.ndarray  # (h, w) float16, mean attention map
    foreground: np.ndarray  # (H, W, 4) uint8 RGBA cut-out
    background: np.ndarray  # (H, W, 3) uint8 inpainted background
    meta: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Its arrays' bytes: what it costs in memory, and in Ray's object store when handed on."""
        arrays = (self.image, self.mask, self.prelim, self.attention, self.foreground, self.background)
        return sum(a.nbytes for a in arrays)


@dataclass(frozen=True)
class RefineSettings:
    """Step 4b's settings: `DistillConfig`'s mask rule and edge snapping (and its defaults), the radius in
    pixels."""

    rule: str
    close_and_fill: bool
    edges: str
    edge_radius_px: int
    edge_eps: float


@dataclass
class Draft:
    """One sample after the model calls (Steps 1-4), before Step 4b: what its refined mask and its `Triplet`
    are made from. Arrays are on the model's canvas, except `original` (label mode: the image in its own
    size; None in synthesis mode, where the canvas is the image).

    What is left is CPU work (the difference map's mask rule and the edge snapping: tens of milliseconds at
    512 px), so a Ray job's GPU actor hands drafts on and its CPU writer tasks call `finish()`."""

    key: str
    image: np.ndarray  # (S, S, 3) uint8 canvas
    background: np.ndarray  # (S, S, 3) uint8 canvas: M_pre's region inpainted with the background prompt
    prelim: np.ndarray  # (h, w) bool, latent resolution, canvas coordinates
    attention: np.ndarray  # (h, w) float16
    canvas: Canvas
    original: np.ndarray | None
    settings: RefineSettings
    meta: dict

    @property
    def nbytes(self) -> int:
        """Its arrays' bytes: what it costs in Ray's object store when handed on."""
        arrays = (self.image, self.background, self.prelim, self.attention)
        return sum(a.nbytes for a in arrays) + (self.original.nbytes if self.original is not None else 0)

    def finish(self, settings: RefineSettings | None = None) -> Triplet:
        """Steps 5-6: the refined mask and the triplet, in the image's own size. `settings` (default: the
        draft's own) finishes the same draft by another Step 4b rule, e.g. the paper's `edges="none"` next to
        the snapped default, from the same M_pre and background (`trainers evaluate-masks`)."""
        t0 = time.perf_counter()
        s, c = settings or self.settings, self.canvas
        # 5. Refined mask: rule(|x - background|) AND M_pre (Step 4b), its edges snapped to the image's
        #    (`edges: guided`, ours; "none" = the paper's), then back to the image's own size.
        mask, _, refine_stats, snap = refine_mask(
            self.image,
            self.background,
            self.prelim,
            c,
            rule=s.rule,
            close_and_fill=s.close_and_fill,
            edges=s.edges,
            edge_radius=s.edge_radius_px,
            edge_eps=s.edge_eps,
        )
        image = self.original if self.original is not None else crop_valid(self.image, c)
        h, w = image.shape[:2]
        mask_o = resize_mask(crop_valid(mask, c), h, w)
        bg = crop_valid(self.background, c)
        if bg.shape[:2] != (h, w):
            from PIL import Image

            bg = np.asarray(Image.fromarray(bg).resize((w, h), Image.BICUBIC))

        # 6. The triplet: image, masks, attention, RGBA foreground, background, metadata.
        fg = np.concatenate([image, (mask_o * 255).astype(np.uint8)[..., None]], -1)
        meta = {
            **self.meta,
            "refine_stats": refine_stats.as_dict(),
            "edges": snap,  # "snapped", "unsnapped" (would erase M: filters.reject_edgeless) or "off"
            "mask_area": float(mask_o.mean()),
        }
        meta["timings"] = {**meta.get("timings", {}), "refine_s": time.perf_counter() - t0}
        return Triplet(self.key, image, mask_o, self.prelim, self.attention, fg, bg, meta)
