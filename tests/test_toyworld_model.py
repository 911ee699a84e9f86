"""The shipped toyworld model loads offline, by path and by short name, as a real SD pipeline."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from factory.method.loading import SHORT_NAMES, ModelLoadError, load_pipeline, resolve_model

TOYWORLD = SHORT_NAMES["toyworld"]


def test_loads_by_path_with_plain_diffusers():
    pipe = StableDiffusionPipeline.from_pretrained(TOYWORLD, local_files_only=True)
    assert pipe.unet.config.sample_size == 16 and pipe.vae.config.latent_channels == 4
    assert pipe.vae.config.scaling_factor != 1.0
    assert len(pipe.tokenizer) > 500 and pipe.tokenizer.model_max_length == 16
    cross = {
        n.split(".transformer_blocks")[0] for n in pipe.unet.attn_processors if n.endswith("attn2.processor")
    }
    assert len(cross) >= 3  # cross-attention at 16x16, 8x8 and in the 4x4 middle block


def test_loads_by_short_name_and_generates():
    pipe = load_pipeline("toyworld")
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.beta_schedule == "scaled_linear" and pipe.scheduler.config.steps_offset == 1
    out = pipe(
        "a photo of a star",
        num_inference_steps=4,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


def test_model_card_reports_the_measured_quality():
    card = (TOYWORLD / "README.md").read_text()
    quality = json.loads((TOYWORLD / "quality.json").read_text())
    assert f"{quality['auc']:.3f}" in card
    assert (TOYWORLD / "samples.png").exists()


def test_clear_errors_for_bad_model_names(tmp_path):
    with pytest.raises(ModelLoadError, match="not a diffusers pipeline directory"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        load_pipeline("no-such-org/no-such-model")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            load_pipeline("toyworld", device="cuda")
    with pytest.raises(ModelLoadError, match="fp16 on the CPU"):
        load_pipeline("toyworld", device="cpu", dtype="fp16")
