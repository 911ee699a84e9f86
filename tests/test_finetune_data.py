"""Fine-tuning data and loss (paper Step 3) without Ray: geometry, joint augmentation, tasks, loss,
configs."""

import json

import numpy as np
import pytest
import torch

from factory.method.geometry import to_canvas
from factory.yaml_config import ConfigError
from trainers.finetune.config import FinetuneConfig, deepspeed_config, load_finetune_config
from trainers.finetune.data import aligned_pair, augment, make_example, to_examples
from trainers.finetune.worker import masked_mse


def _square_image(h=48, w=64):
    img = np.zeros((h, w, 3), np.uint8)
    img[10:30, 20:40] = 255
    return img


def test_aligned_pair_restores_the_label_geometry():
    """A label shard stores the original image and M_pre on the latent grid of the padded canvas."""
    img = _square_image()
    _, canvas = to_canvas(img, 64)  # 48x64 -> valid 48x64 on a 64 canvas
    prelim = np.zeros((16, 16), np.uint8)
    prelim[2:8, 5:10] = 255  # canvas cells (4 px each): rows 8..32, cols 20..40
    image, mask = aligned_pair(img, prelim, canvas.as_dict())
    assert image.shape == (48, 64, 3) and mask.shape == (48, 64) and mask.dtype == bool
    assert mask[8:32, 20:40].all() and mask.sum() == 24 * 20


def test_augment_transforms_image_and_mask_jointly():
    img = _square_image(64, 96)
    mask = img[..., 0] > 0
    for seed in range(10):
        x, m = augment(img, mask, 64, 4, np.random.default_rng(seed))
        assert x.shape == (3, 64, 64) and m.shape == (16, 16)
        assert float(x.min()) >= -1 and float(x.max()) <= 1
        bright = (x[0] > 0).float()
        pooled = torch.nn.functional.avg_pool2d(bright[None, None], 4)[0, 0].round().bool().numpy()
        assert (pooled == m).mean() > 0.95, "the mask followed the image through resize, crop and flip"


def test_make_example_chooses_the_two_tasks():
    img = _square_image(64, 64)
    mask = img[..., 0] > 0
    rng = np.random.default_rng(0)
    tasks = {"full": 0, "background": 0}
    for _ in range(200):
        ex = make_example(img, mask, "a photo of a square", "a photo of a background", 64, 4, rng)
        tasks[ex["task"]] += 1
        if ex["task"] == "full":
            assert ex["prompt"] == "a photo of a square" and ex["loss_mask"].all()
        else:
            assert ex["prompt"] == "a photo of a background"
            assert 0 < ex["loss_mask"].sum() < ex["loss_mask"].size
    assert 70 < tasks["full"] < 130  # p = 0.5
    only_bg = make_example(img, mask, "a", "b", 64, 4, rng, p_full=0.0)
    assert only_bg["task"] == "background"


def test_to_examples_reads_label_rows_and_filters_concepts():
    img = _square_image(64, 64)
    prelim = np.zeros((16, 16), np.uint8)
    prelim[2:8, 5:10] = 255
    _, canvas = to_canvas(img, 64)
    meta = {"concept": "square", "prompt": "a photo of a square", "canvas": canvas.as_dict()}
    batch = {
        "png": [img, img],
        "prelim.png": [prelim, prelim],
        "json": [meta, {**meta, "concept": "star"}],
        "__key__": ["a", "b"],
    }
    out = to_examples(batch, 64, 4, "a photo of a background", 0.5, concepts=["square"])
    assert out["pixel_values"].shape == (1, 3, 64, 64) and out["loss_mask"].shape == (1, 16, 16)
    assert to_examples(batch, 64, 4, "bg", 0.5, concepts=["dog"])["pixel_values"].shape == (0, 3, 64, 64)
    with pytest.raises(KeyError, match="factory label"):
        to_examples({**batch, "prelim.png": [None, None]}, 64, 4, "bg", 0.5)


def test_masked_loss_is_the_papers_unnormalised_mean():
    pred, target = torch.zeros(2, 4, 8, 8), torch.ones(2, 4, 8, 8)
    mask = torch.zeros(2, 8, 8)
    mask[0, :4] = 1  # half of sample 0, nothing of sample 1
    assert masked_mse(pred, target, mask).item() == pytest.approx(0.25)  # 128 of 512 elements
    assert masked_mse(pred, target, mask, normalize=True).item() == pytest.approx(0.5)  # (1 + 0) / 2
    assert masked_mse(pred, target, torch.ones(2, 8, 8)).item() == pytest.approx(1.0)


def _cfg(**over):
    data = {"data": {"shards": ["x"]}}
    for k, v in over.items():
        section, field = k.split("__")
        data.setdefault(section, {})[field] = v
    return FinetuneConfig.model_validate(data)


def test_deepspeed_config_from_the_shipped_json():
    ds = deepspeed_config(_cfg(train__micro_batch=3, train__grad_accum=2))
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 2
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]  # fp32 on CPUs
    ds3 = deepspeed_config(_cfg(deepspeed__stage=3, deepspeed__offload_optimizer=True))
    assert (
        ds3["zero_optimization"]["stage"] == 3
        and ds3["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    )
    gpu = deepspeed_config(_cfg(scaling__use_gpu=True))
    assert gpu["bf16"]["enabled"]
    assert _cfg(scaling__use_gpu=True).checkpointing() and not _cfg().checkpointing()
    with pytest.raises(ValueError, match="needs GPUs"):
        deepspeed_config(_cfg(train__mixed_precision="fp16"))
    with pytest.raises(FileNotFoundError, match="DeepSpeed config"):
        deepspeed_config(_cfg(deepspeed__config="configs/deepspeed/nope.json"))


def test_finetune_configs_validate(tmp_path):
    for name in ("finetune-toyworld", "finetune-sd15-bird"):
        cfg = load_finetune_config(f"configs/{name}.yaml")
        assert cfg.data.shards and cfg.train.lr == 1e-4
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({"data": {"shards": []}, "train": {"lr": -1, "typo": 1}}))
    with pytest.raises(ConfigError) as err:
        load_finetune_config(bad)
    msg = str(err.value)
    assert "data.shards" in msg and "train.lr" in msg and "train.typo" in msg


def test_a_v_prediction_model_is_trained_on_v():
    from diffusers import DDPMScheduler

    from trainers.finetune.objectives import DiffusionObjective

    z0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    eps = DDPMScheduler(prediction_type="epsilon")
    assert DiffusionObjective(eps).target(z0, noise, t) is noise
    v = DDPMScheduler(prediction_type="v_prediction")
    a = v.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(
        DiffusionObjective(v).target(z0, noise, t), a.sqrt() * noise - (1 - a).sqrt() * z0
    )
    with pytest.raises(ValueError, match="sample"):
        DiffusionObjective(DDPMScheduler(prediction_type="sample"))


def test_a_family_not_served_for_fine_tuning_is_refused_before_ray(tmp_path, monkeypatch):
    # every served family fine-tunes today; the gate (`finetuned_inpainting`) still refuses one that does not,
    # from its configs alone, naming the families that do
    from tiny_models import sd3_pipeline

    from factory.method.families import SD3Family
    from trainers.finetune.train import FinetuneFamilyError, run_finetune

    sd3_pipeline().save_pretrained(tmp_path / "sd3")
    monkeypatch.setattr(SD3Family, "finetuned_inpainting", False)
    cfg = load_finetune_config(
        "configs/finetune-toyworld.yaml", [f"model={tmp_path / 'sd3'}", "data.shards=[/nonexistent]"]
    )
    with pytest.raises(FinetuneFamilyError, match="is of the sd3 family.*serves the families sd, sdxl, flux"):
        run_finetune(cfg)


def test_lora_is_a_config_section_under_every_zero_stage():
    from trainers.finetune.config import LORA_TARGETS, deepspeed_config

    cfg = load_finetune_config("configs/finetune-toyworld.yaml", ["lora={rank: 8}"])
    assert (cfg.lora.rank, cfg.lora.alpha, tuple(cfg.lora.targets)) == (8, None, LORA_TARGETS)
    assert deepspeed_config(cfg)["zero_optimization"]["stage"] == 2
    zero3 = load_finetune_config("configs/finetune-toyworld.yaml", ["lora={rank: 8}", "deepspeed.stage=3"])
    assert deepspeed_config(zero3)["zero_optimization"]["stage"] == 3  # the frozen base partitioned too
    assert load_finetune_config("configs/finetune-toyworld.yaml").lora is None
