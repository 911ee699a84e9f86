"""Segmentation metrics as the paper reports them: pixel counts pooled over the whole dataset."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.metrics import roc_auc_score


@dataclass
class PooledSegmentationMetrics:
    """Accumulates pixel counts over a dataset: ACC, foreground IoU, mIoU = (IoU_fg + IoU_bg) / 2."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0
    per_image_iou: list = field(default_factory=list)

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        p, g = np.asarray(pred, bool), np.asarray(gt, bool)
        if p.shape != g.shape:
            raise ValueError(f"prediction {p.shape} and ground truth {g.shape} differ in shape")
        tp = int((p & g).sum())
        fp = int((p & ~g).sum())
        fn = int((~p & g).sum())
        self.tp += tp
        self.fp += fp
        self.fn += fn
        self.tn += int((~p & ~g).sum())
        union = tp + fp + fn
        self.per_image_iou.append(tp / union if union else 1.0)

    def compute(self) -> dict:
        total = self.tp + self.fp + self.fn + self.tn
        iou_fg = self.tp / max(self.tp + self.fp + self.fn, 1)
        iou_bg = self.tn / max(self.tn + self.fp + self.fn, 1)
        return {
            "acc": (self.tp + self.tn) / max(total, 1),
            "iou": iou_fg,
            "miou": (iou_fg + iou_bg) / 2,
            "per_image_iou": float(np.mean(self.per_image_iou)) if self.per_image_iou else float("nan"),
            "n_images": len(self.per_image_iou),
            "counts": {"tp": self.tp, "fp": self.fp, "fn": self.fn, "tn": self.tn},
        }

    @classmethod
    def pooled(cls, results: list[dict]) -> dict:
        """Pool several `compute()` results (e.g. one per concept) into one, by summing their pixel counts."""
        m = cls()
        for r in results:
            for k in ("tp", "fp", "fn", "tn"):
                setattr(m, k, getattr(m, k) + r["counts"][k])
            m.per_image_iou += [r["per_image_iou"]] * r["n_images"]
        return m.compute()


def pixel_auc(maps: list[np.ndarray], gts: list[np.ndarray], normalize: bool = True) -> float:
    """Pixel AUC-ROC of continuous maps against binary GT, pooled over images. With `normalize`, each map
    is min-max scaled to [0, 1] first (the paper's instance-wise normalisation)."""
    scores, labels = [], []
    for m, g in zip(maps, gts, strict=True):
        m = np.asarray(m, np.float64)
        if normalize:
            m = (m - m.min()) / (np.ptp(m) + 1e-12)
        scores.append(m.ravel())
        labels.append(np.asarray(g, bool).ravel())
    y = np.concatenate(labels)
    if y.all() or not y.any():
        raise ValueError("AUC needs both foreground and background pixels in the ground truth")
    return float(roc_auc_score(y, np.concatenate(scores)))


def pixel_auc_by_group(
    maps: list[np.ndarray], gts: list[np.ndarray], groups: list[str], normalize: bool = True
) -> dict[str, float]:
    """`pixel_auc` within each group (e.g. each concept), pooled over that group's images, in sorted order.
    One concept whose attention fails can hide in a pooled figure that still looks fine."""
    if not len(maps) == len(gts) == len(groups):
        raise ValueError(f"maps, gts and groups differ in length: {len(maps)}, {len(gts)}, {len(groups)}")
    out = {}
    for g in sorted(set(groups)):
        idx = [i for i, k in enumerate(groups) if k == g]
        out[g] = pixel_auc([maps[i] for i in idx], [gts[i] for i in idx], normalize)
    return out
