import numpy as np
import pytest

from factory.method.masks import binarize, gmm_midpoint, majority_filter, otsu


def _bimodal(rng, shape=(32, 32), lo=0.1, hi=0.8):
    m = np.zeros(shape, bool)
    m[8:20, 10:24] = True
    return m, np.where(m, hi, lo) + rng.normal(0, 0.03, shape)


def test_gmm_threshold_is_the_midpoint_of_the_means():
    rng = np.random.default_rng(0)
    gt, v = _bimodal(rng)
    mask, st = gmm_midpoint(v)
    assert st.threshold == pytest.approx(np.mean(st.means))
    assert st.means[0] == pytest.approx(0.1, abs=0.01) and st.means[1] == pytest.approx(0.8, abs=0.01)
    assert np.array_equal(mask, v > st.threshold) and (mask == gt).mean() > 0.99
    assert st.bimodality > 10 and sum(st.weights) == pytest.approx(1.0)


def test_midpoint_differs_from_posterior_boundary_for_unequal_variances():
    rng = np.random.default_rng(1)
    v = np.concatenate([rng.normal(0.0, 0.05, 3000), rng.normal(1.0, 0.4, 1000)])
    _, st = gmm_midpoint(v)
    assert st.threshold == pytest.approx((st.means[0] + st.means[1]) / 2)


def test_majority_filter_removes_orphans_and_keeps_borders():
    m = np.zeros((9, 9), bool)
    m[4, 4] = True  # an orphan
    m[0, 0] = True  # a border pixel keeps its value
    m[5:8, 1:4] = True  # a solid 3x3 block survives at its centre
    out = majority_filter(m)
    assert not out[4, 4] and out[0, 0] and out[6, 2]
    hole = np.ones((7, 7), bool)
    hole[3, 3] = False
    assert majority_filter(hole)[3, 3]  # a one-pixel hole is filled (>= 5 of 9)


def test_otsu_and_gmm3_rules():
    rng = np.random.default_rng(2)
    gt, v = _bimodal(rng)
    mask, st = otsu(v)
    assert (mask == gt).mean() > 0.99 and st.rule == "otsu"
    three = np.full((30, 30), 0.1)
    three[:, 10:20] = 0.5
    three[10:20, 12:18] = 0.9
    three = three + rng.normal(0, 0.02, three.shape)
    top, st3 = gmm_midpoint(three, k=3)
    assert top[15, 15] and not top[5, 15] and not top[5, 5] and len(st3.means) == 3


def test_binarize_errors_and_constant_maps():
    with pytest.raises(ValueError, match="unknown mask rule"):
        binarize(np.zeros((4, 4)), "median")
    mask, st = binarize(np.full((8, 8), 0.3))
    assert not mask.any() and st.bimodality == 0.0
    with pytest.raises(ValueError, match="NaN"):
        gmm_midpoint(np.array([[np.nan, 1.0]]))
