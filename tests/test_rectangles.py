"""The background-rectangle sampler of paper Step 3 obeys the reference code's rules (property tests)."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from trainers.finetune.rectangles import RectangleRules, background_rectangle


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask)
    return rows.min(), rows.max(), cols.min(), cols.max()


@st.composite
def foregrounds(draw, side=64):
    """A foreground mask: a few random filled rectangles on the grid."""
    fg = np.zeros((side, side), bool)
    for _ in range(draw(st.integers(0, 3))):
        r0, c0 = draw(st.integers(0, side - 1)), draw(st.integers(0, side - 1))
        h, w = draw(st.integers(1, side)), draw(st.integers(1, side))
        fg[r0 : r0 + h, c0 : c0 + w] = True
    return fg


@settings(max_examples=150, deadline=None)
@given(fg=foregrounds(), seed=st.integers(0, 2**32 - 1))
def test_rectangle_rules_on_the_paper_grid(fg, seed):
    rules = RectangleRules.for_grid(64)
    assert rules == RectangleRules()  # at 64 x 64 the limits are the paper's own
    m = background_rectangle(fg, np.random.default_rng(seed), rules)
    assert m.shape == fg.shape and m.dtype == bool
    assert not (m & fg).any(), "the loss mask never covers foreground"
    if fg.sum() >= fg.size - 1:
        assert not m.any(), "an all-foreground image contributes no loss"
        return
    if np.array_equal(m, ~fg):
        return  # the fallback after 100 rejected tries: every background cell
    r0, r1, c0, c1 = _box(m)
    width, height = r1 - r0, c1 - c0  # the box's corners are background cells, so they are in m
    assert m[r0, c0] or m[r0, c1] or m[r1, c0] or m[r1, c1]
    area = width * height
    assert width > 10 and height > 10 and area >= 256, "too small a box was accepted"
    assert not (width > 32 and height > 32) and area <= 1024, "too large a box was accepted"
    box = np.zeros_like(fg)
    box[r0 : r1 + 1, c0 : c1 + 1] = True
    assert np.array_equal(m, box & ~fg), "the loss mask is exactly the background cells of the box"
    assert m.sum() / area >= 2 / 3


def test_empty_foreground_gives_a_bounded_rectangle():
    rng = np.random.default_rng(0)
    for _ in range(50):
        m = background_rectangle(np.zeros((64, 64), bool), rng)
        r0, r1, c0, c1 = _box(m)
        assert 256 <= (r1 - r0) * (c1 - c0) <= 1024
        assert m.sum() == (r1 - r0 + 1) * (c1 - c0 + 1)  # a full box: no foreground to exclude


def test_fallback_when_no_box_can_fit():
    """A background of two thin strips admits no box: after 100 tries the mask is all background."""
    fg = np.ones((64, 64), bool)
    fg[:, :3] = False
    fg[:2, :] = False
    m = background_rectangle(fg, np.random.default_rng(1))
    assert np.array_equal(m, ~fg)


def test_rules_scale_with_the_latent_grid():
    r = RectangleRules.for_grid(16)
    assert (r.min_side, r.min_area, r.max_side, r.max_area) == (2.5, 16.0, 8.0, 64.0)
    rng = np.random.default_rng(3)
    fg = np.zeros((16, 16), bool)
    fg[5:10, 5:10] = True
    for _ in range(50):
        m = background_rectangle(fg, rng)
        assert not (m & fg).any() and m.any()
        # the same fractions of the image as the paper's 6.25 % .. 25 % boxes (inclusive corners add a row)
        assert m.sum() <= (8 + 1) * (8 + 1)
