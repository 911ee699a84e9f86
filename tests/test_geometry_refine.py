import numpy as np
import pytest

from factory.method.distiller import DistillConfig
from factory.method.geometry import Canvas, to_canvas, to_original
from factory.method.refine import refine_mask


def test_canvas_resizes_long_side_and_pads_right_bottom():
    img = np.full((50, 100, 3), 200, np.uint8)
    canvas, c = to_canvas(img, 64)
    assert canvas.shape == (64, 64, 3) and (c.valid_h, c.valid_w) == (32, 64)
    assert (canvas[:32] == 200).all() and (canvas[32:] == 0).all()
    assert c.latent_valid(4) == (8, 16)
    small, c2 = to_canvas(np.zeros((10, 20, 3), np.uint8), 64)  # small images are upscaled too
    assert (c2.valid_h, c2.valid_w) == (32, 64)
    back = to_original(np.ones((64, 64), bool), c)
    assert back.shape == (50, 100) and back.all()


def test_canvas_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        to_canvas(np.zeros((8, 8, 3), np.float32), 64)
    with pytest.raises(ValueError, match="RGB"):
        to_canvas(np.zeros((8, 8, 5), np.uint8), 64)


def test_refined_mask_is_difference_and_prelim():
    rng = np.random.default_rng(0)
    bg = rng.integers(90, 110, (64, 64, 3)).astype(np.uint8)
    img = bg.copy()
    img[20:40, 20:40] = 250  # the object
    prelim = np.zeros((16, 16), bool)
    prelim[4:11, 4:11] = True  # coarse, overestimating: pixels 16..43
    mask, diff, st, _ = refine_mask(img, bg, prelim, Canvas(64, 64, 64, 64, 64))
    gt = np.zeros((64, 64), bool)
    gt[20:40, 20:40] = True
    assert diff.shape == (64, 64) and st.rule == "gmm"
    assert (mask == gt).mean() > 0.99
    # the AND: a difference outside the preliminary region is not foreground
    img2 = img.copy()
    img2[50:60, 50:60] = 250
    mask2, _, _, _ = refine_mask(img2, bg, prelim, Canvas(64, 64, 64, 64, 64))
    assert not mask2[50:60, 50:60].any()


def test_refine_ignores_padding_and_fills_holes_on_request():
    bg = np.full((64, 64, 3), 100, np.uint8)
    img = bg.copy()
    img[10:30, 10:30] = 230
    img[18:22, 18:22] = 100  # a hole
    prelim = np.ones((16, 16), bool)
    c = Canvas(64, 40, 64, 40, 64)
    m, _, _, _ = refine_mask(img, bg, prelim, c)
    assert not m[40:].any()
    filled, _, _, _ = refine_mask(img, bg, prelim, c, close_and_fill=True)
    assert filled[19, 19] and not m[19, 19]


def test_guided_filter_snaps_a_grid_mask_onto_the_objects_edge():
    from factory.method.edges import snap_to_edges

    yy, xx = np.mgrid[:64, :64]
    disk = (yy - 30.3) ** 2 + (xx - 33.7) ** 2 < 14.5**2
    rng = np.random.default_rng(0)
    image = np.where(disk[..., None], [200, 60, 40], [40, 90, 200]) + rng.normal(0, 6, (64, 64, 3))
    image = image.clip(0, 255).astype(np.uint8)
    grid = disk.reshape(16, 4, 16, 4).mean((1, 3)) > 0.25  # the disk on a 16x16 latent grid, too large
    blocky = np.repeat(np.repeat(grid, 4, 0), 4, 1)

    def iou(m):
        return (m & disk).sum() / (m | disk).sum()

    snapped = snap_to_edges(blocky, image, radius=12, eps=0.01)
    assert iou(blocky) < 0.9 and iou(snapped) > 0.97 and iou(snapped) > iou(blocky)
    # from the latent grid directly (bilinear first), the same
    assert iou(snap_to_edges(grid, image, radius=12, eps=0.01)) > 0.97
    # all one value stays so; bad arguments are refused
    assert not snap_to_edges(np.zeros((16, 16), bool), image, 12).any()
    assert snap_to_edges(np.ones((64, 64), bool), image, 12).all()
    with pytest.raises(ValueError, match="radius"):
        snap_to_edges(blocky, image, radius=0)
    with pytest.raises(ValueError, match="unknown edges"):
        refine_mask(image, image, grid, Canvas(64, 64, 64, 0, 0), edges="crf")
    with pytest.raises(ValueError, match="unknown edges"):
        DistillConfig(edges="crf")


def test_the_snap_keeps_a_mask_it_would_erase():
    # a small object that differs from its inpainted background but hardly from the image around it: the
    # guided filter sees no edge and averages the mask away; refine_mask then keeps the paper's mask
    from factory.method.edges import snap_to_edges

    image = np.full((64, 64, 3), 100, np.uint8)
    image[30:35, 30:35] = 104
    bg = image.copy()
    bg[30:35, 30:35] = 0
    prelim = np.zeros((16, 16), bool)
    prelim[6:10, 6:10] = True
    c = Canvas(64, 64, 64, 64, 64)
    paper, _, _, off = refine_mask(image, bg, prelim, c)
    assert paper.any() and not paper[:30].any() and not paper[35:].any() and off == "off"
    assert not snap_to_edges(paper, image, 12, 0.01).any()  # the filter alone erases it
    guided, _, _, snap = refine_mask(image, bg, prelim, c, edges="guided")
    assert np.array_equal(guided, paper)
    assert snap == "unsnapped"  # what the job's filter rejects as edgeless_mask (the next test)


def test_the_job_filter_rejects_an_unsnapped_mask_unless_told_not_to():
    # a mask the snap would have erased is mostly wrong (factory/method/refine.py): the job drops it as
    # edgeless_mask by default; filters.reject_edgeless=false keeps it; the paper's rule ("off") is never hit
    from factory.dataset.config import load_config
    from factory.dataset.filters import reject_reason

    meta = {"mask_area": 0.1, "prelim_stats": {"bimodality": 3.0}, "edges": "unsnapped"}
    cfg = load_config("configs/toyworld.yaml")
    assert reject_reason(meta, cfg) == "edgeless_mask"
    assert reject_reason({**meta, "edges": "snapped"}, cfg) is None
    assert reject_reason({**meta, "edges": "off"}, cfg) is None
    keep = load_config("configs/toyworld.yaml", ["filters.reject_edgeless=false"])
    assert reject_reason(meta, keep) is None
