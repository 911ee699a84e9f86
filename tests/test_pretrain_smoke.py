"""A few steps of the toyworld pretraining recipe: finite, falling loss; resume; a loadable export."""

import json

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from trainers.toyworld_pretrain import PretrainConfig, pretrain


def test_pretrain_recipe_smoke_and_resume(tmp_path):
    torch.set_num_threads(2)
    cfg = PretrainConfig(out=str(tmp_path / "model"), work_dir=str(tmp_path / "work"), pool_size=64,
                         vae_steps=3, vae_batch=4, unet_steps=40, batch=8, lr=1e-3, eval_every=40,
                         eval_images=2, ckpt_every=20, target_auc=None)
    info = pretrain(cfg)
    assert info["steps"] == 40
    assert (tmp_path / "work" / "vae" / "config.json").exists()
    ckpt = torch.load(tmp_path / "work" / "unet_ckpt.pt", weights_only=False)
    assert ckpt["step"] == 40 and ckpt["done"]
    hist = info["history"]
    assert len(hist) == 1 and np.isfinite(hist[0]["loss"]) and 0.0 <= hist[0]["auc"] <= 1.0
    training = json.loads((tmp_path / "model" / "training.json").read_text())
    assert training["steps"] == 40

    # resume: a longer budget continues from step 40 instead of starting over
    cfg.unet_steps = 50
    info2 = pretrain(cfg)
    assert info2["steps"] == 50
    assert [h["step"] for h in info2["history"]] == [40, 50] and all(np.isfinite(h["loss"]) for h in info2["history"])

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "model", local_files_only=True)
    img = pipe("a photo of a ring", num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 64, 64, 3)


def test_unet_loss_falls():
    """On a fixed small pool the epsilon-prediction loss falls within a few dozen steps."""
    import tempfile
    from pathlib import Path

    from transformers import CLIPTokenizer

    from factory.toyworld import model as tw
    from factory.toyworld.tokenizer import write_clip_tokenizer
    from factory.toyworld.world import vocabulary
    from trainers.toyworld_pretrain import PretrainConfig, render_pool, train_unet

    with tempfile.TemporaryDirectory() as d:
        tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(d) / "tok", vocabulary(), 16))
        torch.manual_seed(0)
        vae = tw.build_vae().eval()
        pool = render_pool(32)
        cfg = PretrainConfig(work_dir=d, unet_steps=60, batch=8, lr=1e-3, eval_every=10**6, target_auc=None,
                             ckpt_every=10**6)
        _, _, info = train_unet(cfg, vae, tok, pool, Path(d), None)
        losses = info["loss_curve"]
        assert len(losses) == 60 and all(np.isfinite(losses))
        assert np.mean(losses[-15:]) < 0.8 * np.mean(losses[:5])
