"""Quality regressions of the shipped toyworld model against ground truth (not just code paths)."""

import numpy as np
import pytest

from factory.toyworld.world import render
from trainers.evaluate.metrics import pixel_auc, pixel_auc_by_group
from trainers.evaluate.score import grabcut_mask
from trainers.toyworld.quality import QUALITY_SEED_BASE, probe_samples, upsample


def test_shipped_model_attention_localizes_the_concept(toyworld_pipe):
    """The paper's probe (40 of 50 DDIM steps) on held-out renders: the issue's goal is AUC >= 0.90, and every
    concept localizes on its own (measured with the shipped v2: pooled 0.958, 0.935 for rings to 0.979 for
    circles, 2-6 images each; v1: 0.91 for rings to 0.98 for circles; v2's UNet before its text encoder was
    swapped back, which reached 0.90 pooled, scored 0.45 on its stars here)."""
    samples = [render(QUALITY_SEED_BASE + 500 + i, background_only=False) for i in range(24)]
    maps = upsample(probe_samples(toyworld_pipe, samples, batch=24), 64)
    gts = [s.mask for s in samples]
    assert pixel_auc(list(maps), gts) >= 0.90
    by_concept = pixel_auc_by_group(list(maps), gts, [s.concept for s in samples])
    assert len(by_concept) == 6 and min(by_concept.values()) >= 0.85, by_concept


def test_pixel_auc_by_group_scores_each_group_alone():
    gt = np.zeros((4, 4), bool)
    gt[1:3, 1:3] = True
    good, inverted = gt.astype(float), (~gt).astype(float)
    by = pixel_auc_by_group([good, inverted, good], [gt, gt, gt], ["star", "circle", "star"])
    assert by == {
        "circle": 0.0,
        "star": 1.0,
    }  # sorted by group; a collapsed group shows however the pool looks
    assert 0.0 < pixel_auc([good, inverted, good], [gt, gt, gt]) < 1.0
    with pytest.raises(ValueError, match="differ in length"):
        pixel_auc_by_group([good], [gt], ["star", "circle"])


def test_grabcut_baseline_runs_on_toyworld():
    s = render(QUALITY_SEED_BASE, background_only=False)
    m = grabcut_mask(s.image)
    assert m.shape == s.mask.shape and 0 < m.mean() < 1


@pytest.mark.slow
def test_refined_masks_beat_preliminary_masks(tmp_path, toyworld_pipe):
    """Paper Table 2's ordering, in toyworld: refined M improves on M_pre (paper settings, 48 images)."""
    from factory.method.distiller import Distiller
    from factory.toyworld.world import write_split
    from trainers.evaluate.method_masks import evaluate_distiller

    split = write_split(tmp_path / "split", range(3_000_000_000, 3_000_000_048))
    res = evaluate_distiller(
        Distiller("toyworld", pipeline=toyworld_pipe), split, batch=16, out=tmp_path / "eval"
    )
    assert res["refined"]["iou"] > res["prelim"]["iou"] > 0.35
    assert res["attention_auc"] > 0.9 and (tmp_path / "eval" / "contact_sheet.png").exists()
    assert np.isfinite(res["refined"]["miou"])
