"""Students (paper Step 6): timm-backbone models, shard targets, evaluation, and concurrent Ray training."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from factory.method.geometry import Canvas, to_canvas
from factory.toyworld.world import write_split
from trainers.evaluate.score import box_iou, evaluate, folder_predictor, grabcut_predictor, labelled_set
from trainers.students.config import StudentsConfig, load_students_config
from trainers.students.data import (
    augment_pair,
    prepare_rows,
    split_to_shards,
    target_of,
    to_student_examples,
)
from trainers.students.export import load_student
from trainers.students.model import PretrainedWeightsError, boundary_band, build_student, student_loss
from trainers.students.tune import run_student_jobs, run_students

TINY = {"decoder_channels": [32, 16, 16, 8, 8]}


def _png(a):
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _row(h=48, w=64):
    img = np.zeros((h, w, 3), np.uint8)
    img[8:24, 16:40] = 200
    mask = np.zeros((h, w), np.uint8)
    mask[8:24, 16:40] = 255
    _, canvas = to_canvas(img, 64)  # valid 48x64 on a 64 canvas; latent grid 16x16
    prelim = np.zeros((16, 16), np.uint8)
    prelim[2:6, 4:10] = 255
    attn = np.zeros((16, 16), np.float16)
    attn[2:6, 4:10] = 1
    buf = io.BytesIO()
    np.save(buf, attn)
    meta = {"concept": "square", "canvas": canvas.as_dict()}
    return {
        "__key__": "k",
        "png": _png(img),
        "mask.png": _png(mask),
        "prelim.png": _png(prelim),
        "attn.npy": buf.getvalue(),
        "json": json.dumps(meta).encode(),
    }


def test_targets_align_with_the_image():
    row = _row()
    refined = target_of(row, "refined")
    assert refined.shape == (48, 64) and refined[8:24, 16:40].all() and refined.sum() == 16 * 24
    for kind in ("prelim", "attention"):
        t = target_of(row, kind)
        assert t.shape == (48, 64) and 0 <= t.min() and t.max() <= 1
        assert t[16, 28] > 0.9 and t[40, 5] < 0.1, f"{kind} target is where the object is"
    with pytest.raises(ValueError, match="unknown target"):
        target_of(row, "gt")


def test_a_targets_valid_region_is_the_factorys_on_a_non_square_image():
    """50 x 64 onto a 64 canvas: valid rows 50, so 12.5 latent cells of 4 px. The factory's M_pre covers the
    partial 13th row (`Canvas.latent_valid`); the students used to round it away (issue 31)."""
    from factory.method.geometry import resize_mask

    row = _row(h=50)
    meta = json.loads(row["json"])
    assert Canvas(**meta["canvas"]).latent_valid(4) == (13, 16)
    prelim = np.zeros((16, 16), np.uint8)
    prelim[12, 4:10] = 255  # an object in the partially covered cell row only
    row["prelim.png"] = _png(prelim)
    t = target_of(row, "prelim")
    factory = resize_mask(prelim[:13, :16] > 0, 50, 64)  # how the factory maps M_pre to the image
    assert factory[-1].any() and t[-1, 16:40].min() > 0.5 and (t >= 0.5)[factory].mean() > 0.9


def test_augmentation_and_multiclass_labels():
    rng = np.random.default_rng(0)
    img = np.zeros((64, 96, 3), np.uint8)
    img[:, :48] = 255
    target = (img[..., 0] > 0).astype(np.float32)
    img[..., 1] = 255  # green everywhere: after any channel order / inversion, one channel still tells halves
    for augment in ("paper", "colour"):
        for _ in range(8):
            x, y = augment_pair(img, target, 32, rng, augment)
            assert x.shape == (3, 32, 32) and y.shape == (32, 32) and -1 <= x.min() and x.max() <= 1
            # image and target were cropped and flipped together: the channels that vary follow the target
            varying = [(ch, (ch.max() + ch.min()) / 2) for ch in x if np.ptp(ch) > 0.5]
            assert varying and all(
                np.array_equal(ch > mid, y > 0.5) or np.array_equal(ch < mid, y > 0.5) for ch, mid in varying
            )
    with pytest.raises(ValueError, match="unknown augment"):
        augment_pair(img, target, 32, rng, "mixup")
    batch = {k: [v] for k, v in _row().items()}
    prepared = prepare_rows(batch, 32, classes=["star", "square"])
    assert prepared["stack"].dtype == np.uint8 and prepared["stack"].shape == (1, 4, 32, 43)
    out = to_student_examples(prepared, 32, multiclass=True)
    assert set(np.unique(out["target"])) <= {0.0, 2.0} and (out["target"] == 2).any()
    assert out["image"].shape == (1, 3, 32, 32)
    assert prepare_rows(batch, 32, concepts=["star"])["stack"].shape == (0, 4, 32, 32)
    # validation crops are centred and fixed; images of other aspect ratios make a ragged column
    val = to_student_examples(prepared, 32, augment=None)
    assert np.array_equal(val["image"], to_student_examples(prepared, 32, augment=None)["image"])
    tall = {k: [v, v] for k, v in _row().items()}
    tall["png"] = [tall["png"][0], _png(np.zeros((80, 40, 3), np.uint8))]
    tall["mask.png"] = [tall["mask.png"][0], _png(np.zeros((80, 40), np.uint8))]
    ragged = prepare_rows(tall, 32)
    assert [s.shape for s in ragged["stack"]] == [(4, 32, 43), (4, 64, 32)]
    assert to_student_examples(ragged, 32)["image"].shape == (2, 3, 32, 32)


def test_build_student_from_any_timm_backbone_offline(tmp_path):
    import timm

    for name in ("resnet10t", "mobilenetv3_small_100"):
        m = build_student(name, 1, decoder_kwargs=TINY)
        assert m(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 64, 64)
    assert build_student("resnet10t", 3, "FPN")(torch.zeros(1, 3, 64, 64)).shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="unknown timm backbone"):
        build_student("resnet_does_not_exist")
    with pytest.raises(PretrainedWeightsError, match="never downloaded"):
        build_student("resnet10t", pretrained=str(tmp_path / "missing.safetensors"))
    # a local timm checkpoint loads into the encoder
    from safetensors.torch import save_file

    torch.manual_seed(1)
    ref = timm.create_model("resnet10t", pretrained=False)
    save_file(ref.state_dict(), str(tmp_path / "r.safetensors"))
    m = build_student("resnet10t", pretrained=str(tmp_path / "r.safetensors"))
    assert torch.equal(m.encoder.model.state_dict()["conv1.0.weight"], ref.state_dict()["conv1.0.weight"])


def test_student_losses():
    logits, target = torch.zeros(2, 1, 8, 8), torch.ones(2, 8, 8)
    assert student_loss(logits, target).item() == pytest.approx(np.log(2), rel=1e-5)
    assert student_loss(logits, target, "bce+dice").item() > student_loss(logits, target).item()
    assert student_loss(
        torch.zeros(2, 3, 8, 8), torch.zeros(2, 8, 8), multiclass=True
    ).item() == pytest.approx(np.log(3), rel=1e-5)


def test_the_ignore_band_leaves_the_labels_boundary_out_of_the_loss():
    target = torch.zeros(1, 8, 8)
    target[0, 2:6, 2:6] = 1.0  # a 4 x 4 square
    band = boundary_band(target, 1)
    ring = torch.zeros(8, 8, dtype=torch.bool)
    ring[1:7, 1:7] = True
    ring[3:5, 3:5] = False  # one pixel each side of the square's edge
    assert torch.equal(band[0], ring)
    logits = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    keep = ~ring
    by_hand = F.binary_cross_entropy_with_logits(logits[0, 0][keep], target[0][keep])
    assert student_loss(logits, target, ignore_band=1).item() == pytest.approx(by_hand.item(), rel=1e-6)
    # what the band holds does not count: the same loss whatever the student says there
    moved = logits.clone()
    moved[0, 0][ring] = 50.0
    assert student_loss(moved, target, ignore_band=1).item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert student_loss(moved, target).item() > by_hand.item()
    classes = target.long() * 2  # a multi-class label: the band is ignored there too
    ce = F.cross_entropy(torch.zeros(1, 3, 8, 8), classes.masked_fill(ring[None], -100), ignore_index=-100)
    assert student_loss(torch.zeros(1, 3, 8, 8), classes, multiclass=True, ignore_band=1).item() == (
        pytest.approx(ce.item())
    )


def test_the_ema_teacher_follows_the_student_and_blends_the_target():
    from trainers.students.loop import EMATeacher

    student = build_student(
        "mobilenetv3_small_100", 1, "Unet", None, {"decoder_channels": [32, 16, 16, 8, 8]}
    )
    teacher = EMATeacher(student, decay=0.75)
    before = [p.clone() for p in teacher.model.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01)
    teacher.update(student)
    for t, b in zip(teacher.model.parameters(), before, strict=True):
        torch.testing.assert_close(t, b + 0.0025)  # a quarter of the way to the student
    x, target = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)), torch.ones(2, 64, 64)
    p = torch.sigmoid(teacher.model(x)[:, 0])
    assert torch.isfinite(p).all() and p.std() > 0
    torch.testing.assert_close(teacher.blend(x, target, 0.3), 0.7 * target + 0.3 * p)
    assert not any(q.requires_grad for q in teacher.model.parameters())
    with pytest.raises(ValueError, match="train.teacher serves binary students"):
        StudentsConfig.model_validate(
            {"data": {"shards": ["x"]}, "train": {"teacher": 0.3}, "multiclass": True}
        )


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    d = tmp_path_factory.mktemp("split")
    write_split(d / "star", range(3_100_000_000, 3_100_000_024), concept="star")
    write_split(d / "heart", range(3_200_000_000, 3_200_000_024), concept="heart")
    return d


def test_evaluate_mask_sources_pooled_and_boxes(split, tmp_path):
    rows = labelled_set(split / "star")
    assert len(rows) == 24 and all(r["concept"] == "star" for r in rows)
    # a folder holding the ground truth itself scores perfectly
    res = evaluate(
        rows, folder_predictor(split / "star" / "masks", rows, 64), 64, bbox=True, out=tmp_path / "e"
    )
    assert (
        res["acc"] == pytest.approx(1.0)
        and res["iou"] == pytest.approx(1.0)
        and res["box_iou"] == pytest.approx(1.0)
    )
    assert (tmp_path / "e" / "cases.png").exists() and json.loads(
        (tmp_path / "e" / "metrics.json").read_text()
    )
    gc = evaluate(rows, grabcut_predictor(64), 64)
    assert 0.2 < gc["acc"] < 1.0 and 0.0 < gc["iou"] < 0.9
    assert box_iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)
    with pytest.raises(FileNotFoundError, match="no predicted mask"):
        folder_predictor(tmp_path, rows, 64)


def test_cub_style_layout(tmp_path):
    for sub in ("images/001.Bird", "segmentations/001.Bird"):
        (tmp_path / sub).mkdir(parents=True)
    img = np.zeros((40, 50, 3), np.uint8)
    Image.fromarray(img).save(tmp_path / "images/001.Bird/a.jpg")
    Image.fromarray(np.full((40, 50), 255, np.uint8)).save(tmp_path / "segmentations/001.Bird/a.png")
    rows = labelled_set(tmp_path)
    assert [r["id"] for r in rows] == ["001.Bird/a"] and rows[0]["mask"].suffix == ".png"


@pytest.fixture(scope="module")
def students(split, tmp_path_factory, local_ray):
    d = tmp_path_factory.mktemp("students")
    split_to_shards(str(split / "star"), str(d / "gt-star"), samples_per_shard=12)
    split_to_shards(str(split / "heart"), str(d / "gt-heart"), samples_per_shard=12)
    return d


def _cfg(d, *extra):
    return load_students_config(
        "configs/students-toyworld.yaml",
        [
            f"data.shards=[{d / 'gt-star'}, {d / 'gt-heart'}]",
            "data.concepts=[star, heart]",
            "train.steps=12",
            "train.batch=8",
            "checkpoint.every=6",
            f"output.storage={d / 'runs'}",
            f"output.export={d / 'export'}",
            "model.decoder_kwargs={decoder_channels: [32, 16, 16, 8, 8]}",
            "data.val_every=4",
            *extra,
        ],
    )


@pytest.mark.training
def test_students_for_all_concepts_train_concurrently_and_export(students, split, monkeypatch):
    # relative output paths, as in configs/students-toyworld.yaml: Ray Tune runs each trial in a working
    # directory of its own, and the exports must still land where the user asked
    cfg = _cfg(students, "output.storage=runs", "output.export=export")
    monkeypatch.chdir(students)
    summary = run_students(cfg)
    runs = {r["student"]: r for r in summary["students"]}
    assert set(runs) == {"star", "heart"}
    a, b = runs["star"], runs["heart"]
    assert a["started"] < b["finished"] and b["started"] < a["finished"], (
        "the concepts' runs overlapped in time"
    )
    for name, r in runs.items():
        assert r["metrics"]["step"] == 12 and np.isfinite(r["metrics"]["loss"]) and r["val_images"] > 0
        model, info = load_student(r["export"])
        assert info["concept"] == name and info["resolution"] == 64
        assert Path(r["export"]) == students / "export" / name and (students / "runs").is_dir()
        ts = torch.jit.load(str(students / "export" / name / "last.ts"))
        x = torch.zeros(1, 3, 64, 64)
        assert torch.allclose(ts(x), load_student(r["export"], "last")[0](x), atol=1e-5)
    from trainers.evaluate.score import student_predictor

    predict, info = student_predictor(runs["star"]["export"])
    res = evaluate(labelled_set(split / "star"), predict, info["resolution"])
    assert 0.0 <= res["iou"] <= 1.0 and res["n_images"] == 24


@pytest.mark.training
def test_the_cached_rows_come_in_one_order_whatever_the_order_of_the_shards(students):
    # a student depends on its shards and seed only: its rows come in key order, whatever order the shard
    # files are listed in, the reader shuffles them in (shuffle="files") or Ray Data's blocks arrive in
    from trainers.students.tune import _dataset

    urls = sorted(str(u) for u in students.glob("gt-*/*.tar"))
    assert len(urls) >= 4
    runs = [
        _dataset(_cfg(students), us, None, ["star", "heart"])
        for us in (urls, urls[::-1], urls[1:] + urls[:1])
    ]
    first, first_val = runs[0]
    for train, val in runs[1:]:
        assert np.array_equal(np.stack(train["stack"]), np.stack(first["stack"]))
        assert np.array_equal(train["label"], first["label"])
        assert len(val["image"]) == len(first_val["image"])


@pytest.mark.training
def test_one_multiclass_student_beside_another_job_in_one_tune_run(students):
    # two jobs in one Tune run (the tables' training sets): a multi-class student of twice the steps and a
    # binary one; one at a time, the longer starts first, and each job gets its own exports and summary
    mc = _cfg(students, "multiclass=true", "output.name=mc", "train.steps=24", "scaling.max_concurrent=1")
    binary = _cfg(students, "data.concepts=[star]", "output.name=one")
    binary.output.export = str(students / "export-one")
    summary, other = run_student_jobs([binary, mc])
    [r] = other["students"]
    [b] = summary["students"]
    assert r["metrics"]["step"] == 24 and b["metrics"]["step"] == 12 and b["student"] == "star"
    assert r["finished"] <= b["started"], "the longer student went first, the two one after the other"
    assert json.loads((students / "export-one" / "students.json").read_text())["students"] == [b]
    runs = students / "runs"
    assert (runs / "one-tune").is_dir() and not (runs / "mc-tune").exists(), "one Tune run for both jobs"
    model, info = load_student(r["export"])
    assert (
        r["student"] == "multiclass"
        and info["classes"] == 3
        and info["class_names"] == ["background", "star", "heart"]
    )
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 3, 64, 64)


@pytest.mark.training
@pytest.mark.slow  # ~40 s; the default lane trains several students in one Tune run (the concepts, above)
def test_several_seeds_train_in_one_run(students):
    # train.seeds: one student per concept and seed in the same Tune run, each seed exported on its own
    cfg = _cfg(students, "data.concepts=[star]", "train.seeds=[3, 4]", "output.name=seeds")
    cfg.output.export = str(students / "export-seeds")
    summary = run_students(cfg)
    assert sorted((r["student"], r["seed"]) for r in summary["students"]) == [("star", 3), ("star", 4)]
    a, b = (load_student(students / "export-seeds" / f"seed{s}" / "star", "last")[0] for s in (3, 4))
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(a(x), b(x)), "the two seeds trained two different students"


@pytest.mark.training
@pytest.mark.parametrize(
    "extra",
    [
        # the non-default streamed path (40 s): the slow lane since 2026-12-04
        pytest.param(("data.cache=false",), marks=pytest.mark.slow),
        # with the noisy-label options: the teacher follows the DDP-wrapped student
        ("scaling.workers=2", "scaling.cpus_per_worker=0.25", "train.ignore_band=1", "train.teacher=0.3"),
    ],
    ids=["streamed-every-epoch", "cached-two-workers"],
)
def test_the_streamed_path_and_two_workers_train_and_export(students, extra):
    # the cached default prepares the rows once in the trial and hands each worker its share; data.cache=false
    # streams the shards through Ray Data every epoch, and two DDP workers split the cached rows
    name = "-".join(x.split("=")[0].split(".")[-1] for x in extra)
    cfg = _cfg(students, "data.concepts=[heart]", f"output.name={name}", *extra)
    cfg.output.export = str(students / f"export-{name}")
    [r] = run_students(cfg)["students"]
    assert r["metrics"]["step"] == 12 and np.isfinite(r["metrics"]["loss"]) and r["val_images"] > 0
    model, info = load_student(r["export"])
    assert info["concept"] == "heart" and model(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 64, 64)
