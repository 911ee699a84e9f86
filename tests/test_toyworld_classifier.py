"""The toyworld shape classifier (the yardstick for "recognizable samples") and the shipped model's
samples."""

import numpy as np
import pytest
import torch

from trainers.toyworld.classifier import (
    CLASSES,
    DEFAULT_PATH,
    TEST_SEED_BASE,
    _augment,
    concept_accuracy,
    generate,
    load_or_train,
    predict,
    renders,
    shape_retention,
    train_classifier,
)


def test_renders_are_class_balanced_and_labelled():
    images, labels = renders(70, TEST_SEED_BASE)
    assert images.shape == (70, 64, 64, 3) and images.dtype == np.uint8
    assert np.bincount(labels, minlength=len(CLASSES)).tolist() == [10] * len(CLASSES)


def test_augment_keeps_shape_and_range():
    x = torch.rand(5, 3, 64, 64) * 2 - 1
    y = _augment(x.clone(), torch.Generator().manual_seed(0))
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert (y - x).abs().mean() < 0.5  # blur + noise + flips, not a different image


def test_classifier_training_runs_and_learns_something():
    torch.manual_seed(0)
    model, info = train_classifier(n_train=280, steps=40, batch=16, n_test=70)
    assert 0.0 <= info["test_accuracy"] <= 1.0
    assert predict(model, renders(14, TEST_SEED_BASE)[0]).shape == (14,)


def test_shipped_classifier_reads_held_out_renders():
    assert DEFAULT_PATH.exists(), "the shape classifier ships beside the toyworld model"
    model, info = load_or_train(DEFAULT_PATH)
    images, labels = renders(280, TEST_SEED_BASE + 10_000)
    # measured 0.975 on these 280 and 0.954 on the 700 of its card (chance 1/7; every class >= 0.92); the
    # first classifier (32x32 input) scored 0.786 / 0.787, hearts 0.50
    assert (predict(model, images) == labels).mean() >= 0.92
    assert info["test_accuracy"] >= 0.92 and min(info["test_per_class"].values()) >= 0.9


def test_shipped_model_samples_show_their_concept(toyworld_pipe):
    """Text-to-image samples of the shipped model show every prompted shape, well above chance (1/6; "no
    object" counts as a miss). Measured with exactly these settings and the shipped (second) classifier: the
    64-wide model v2 0.81 (circle and square 1.0, ring 0.875, heart 0.75, triangle and star 0.625); the
    CPU-trained v1 it replaced 0.73 (triangle 0.125), and v1 after its run 3 0.58 (square and star 0.25),
    both of which this bar fails. With the first, weaker classifier v1 after run 3 scored 0.65, after run 2
    0.44 and after run 1 0.17."""
    model, _ = load_or_train(DEFAULT_PATH)
    res = concept_accuracy(toyworld_pipe, model, per_concept=8, guidance=3.0, steps=25, seed=7)
    assert res["mean"] >= 0.75, res
    assert min(res["per_concept"].values()) >= 0.5, res
    assert res["per_concept"]["circle"] >= 0.75 and res["per_concept"]["ring"] >= 0.75, res


def test_shape_retention_of_the_shipped_model(toyworld_pipe):
    """Held-out renders noised to t ~ 300 and denoised with their own prompt mostly keep their shape. Measured
    with exactly these settings: the shipped v2 0.896 (triangles 0.5, every other shape >= 0.875); v1 0.875
    (triangles 0.5), v1 after its run 3 0.833 (its squares 0.75). 48 images cannot tell those apart, so this
    is a regression bar, not the comparison (the model card's figures are on 20 per concept at 50 steps). A
    strength outside (0, 1] is refused."""
    model, _ = load_or_train(DEFAULT_PATH)
    res = shape_retention(toyworld_pipe, model, 0.3, per_concept=8, steps=20)
    assert res["mean"] >= 0.75, res
    with pytest.raises(ValueError, match="strength"):
        shape_retention(toyworld_pipe, model, 0.0)


def test_negative_prompt_replaces_the_empty_prompt(toyworld_pipe):
    """Without a negative prompt guidance steers away from "" (diffusers' default); with one, away from it."""
    toyworld_pipe.set_progress_bar_config(disable=True)
    plain = generate(toyworld_pipe, "square", 2, steps=3)
    empty = generate(toyworld_pipe, "square", 2, steps=3, negative_prompt="")
    background = generate(toyworld_pipe, "square", 2, steps=3, negative_prompt="a photo of a background")
    assert np.allclose(plain, empty, atol=1e-5)
    assert np.abs(plain - background).mean() > 1e-3


def _write_shard(path, samples):
    import io
    import json

    import webdataset as wds
    from PIL import Image

    with wds.TarWriter(str(path)) as w:
        for i, (image, concept) in enumerate(samples):
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="PNG")
            w.write(
                {
                    "__key__": f"{concept}-{i:08d}",
                    "png": buf.getvalue(),
                    "json": json.dumps({"concept": concept}).encode(),
                }
            )


def test_shard_recognizability_reads_a_written_dataset(tmp_path):
    """`trainers toyworld-classifier --shards`: concept accuracy of a dataset already written as WebDataset
    shards (how docs/results.md measures D'_s), here on real renders."""
    import pytest

    from factory.toyworld.world import render
    from trainers.toyworld.classifier import main, shard_recognizability

    renders_ = [
        (render(TEST_SEED_BASE + 20_000 + i, concept=c).image, c)
        for c in ("ring", "square")
        for i in range(6)
    ]
    _write_shard(tmp_path / "shard-000000.tar", renders_[:7])
    _write_shard(tmp_path / "shard-000001.tar", renders_[7:])
    model, _ = load_or_train(DEFAULT_PATH)
    res = shard_recognizability(model, str(tmp_path))
    assert res["samples"] == {"ring": 6, "square": 6}
    assert sum(res["confusion"]["ring"]) == 6 and res["classes"] == list(CLASSES)
    assert (
        res["per_concept"]["ring"] >= 5 / 6 and res["per_concept"]["square"] >= 5 / 6
    )  # crisp renders: easy
    main(["--shards", str(tmp_path)])  # the CLI path prints the same JSON

    bad = tmp_path / "bad"
    bad.mkdir()
    _write_shard(bad / "shard-000000.tar", [(renders_[0][0], "dog")])
    with pytest.raises(ValueError, match="not a toyworld shape"):
        shard_recognizability(model, str(bad))
