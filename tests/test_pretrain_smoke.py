"""A few steps of the toyworld pretraining recipe: finite, falling loss; resume; a loadable export."""

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from factory.toyworld.world import CONCEPTS
from trainers.toyworld.pretrain import PretrainConfig, pretrain


@pytest.mark.training
def test_pretrain_recipe_smoke_and_resume(tmp_path):
    torch.set_num_threads(2)
    cfg = PretrainConfig(
        out=str(tmp_path / "model"),
        work_dir=str(tmp_path / "work"),
        pool_size=64,
        vae_steps=3,
        vae_batch=4,
        unet_steps=40,
        batch=8,
        lr=1e-3,
        eval_every=40,
        eval_images=2,
        ckpt_every=20,
        target_auc=None,
    )
    info = pretrain(cfg, command="trainers pretrain-toyworld (first invocation)")
    assert info["steps"] == 40
    assert (tmp_path / "work" / "vae" / "config.json").exists()
    ckpt = torch.load(tmp_path / "work" / "unet_ckpt.pt", weights_only=False)
    assert ckpt["step"] == 40 and ckpt["done"]
    hist = info["history"]
    assert len(hist) == 1 and np.isfinite(hist[0]["loss"]) and 0.0 <= hist[0]["auc"] <= 1.0
    by_concept = hist[0]["auc_per_concept"]  # the 2 early-stopping renders' concepts, each scored alone
    assert (
        by_concept and set(by_concept) <= set(CONCEPTS) and all(0.0 <= v <= 1.0 for v in by_concept.values())
    )
    training = json.loads((tmp_path / "model" / "training.json").read_text())
    assert training["steps"] == 40

    # resume: a longer budget continues from step 40 instead of starting over
    cfg.unet_steps = 50
    info2 = pretrain(cfg, command="trainers pretrain-toyworld (resumed)")
    assert info2["steps"] == 50
    # both invocations are recorded: the card states the whole command history of a resumed run
    assert json.loads((tmp_path / "model" / "training.json").read_text())["commands"] == [
        "trainers pretrain-toyworld (first invocation)",
        "trainers pretrain-toyworld (resumed)",
    ]
    assert [h["step"] for h in info2["history"]] == [40, 50] and all(
        np.isfinite(h["loss"]) for h in info2["history"]
    )

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "model", local_files_only=True)
    img = pipe(
        "a photo of a ring",
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert img.shape == (1, 64, 64, 3)


def test_render_pool_in_processes_matches_one_process():
    """The pool rendered by worker processes is the same samples, in the same seed order."""
    from trainers.toyworld.pretrain import render_pool

    one, two = render_pool(24, seed_base=7, workers=1), render_pool(24, seed_base=7, workers=2)
    assert [s.concept for s in one] == [s.concept for s in two]
    assert all(
        np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
        for a, b in zip(one, two, strict=True)
    )


@pytest.mark.training
def test_unet_loss_falls():
    """On a fixed small pool the epsilon-prediction loss falls within a few dozen steps."""
    import tempfile
    from pathlib import Path

    from transformers import CLIPTokenizer

    from factory.toyworld import model as tw
    from factory.toyworld.tokenizer import write_clip_tokenizer
    from factory.toyworld.world import vocabulary
    from trainers.toyworld.pretrain import PretrainConfig, render_pool, train_unet

    with tempfile.TemporaryDirectory() as d:
        tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(d) / "tok", vocabulary(), 16))
        torch.manual_seed(0)
        vae = tw.build_vae().eval()
        pool = render_pool(32)
        cfg = PretrainConfig(
            work_dir=d, unet_steps=60, batch=8, lr=1e-3, eval_every=10**6, target_auc=None, ckpt_every=10**6
        )
        _, _, info = train_unet(cfg, vae, tok, pool, Path(d), None)
        losses = info["loss_curve"]
        assert len(losses) == 60 and all(np.isfinite(losses))
        assert np.mean(losses[-15:]) < 0.8 * np.mean(losses[:5])


def test_timestep_weights():

    from factory.toyworld import model as tw
    from trainers.toyworld.pretrain import timestep_weights

    sched = tw.build_train_scheduler()
    eps, v, p2 = (timestep_weights(sched, k) for k in ("eps", "v", "p2"))
    assert torch.allclose(eps, torch.ones(1000))
    for w in (v, p2):
        assert abs(float(w.mean()) - 1.0) < 1e-4 and bool(
            (w[1:] >= w[:-1] - 1e-6).all()
        )  # more weight on noise
    assert float(v.max() / v.min()) <= 20.0 + 1e-3  # the cap
    assert v[900] > 10 * v[50]
    with pytest.raises(ValueError, match="loss weighting"):
        timestep_weights(sched, "snr")


@pytest.mark.training
def test_continue_from_an_exported_model(tmp_path):
    """--init-from: the VAE is taken as is, text encoder + UNet start from the export, the card's chain is
    kept."""
    torch.set_num_threads(2)
    base = PretrainConfig(
        out=str(tmp_path / "m1"),
        work_dir=str(tmp_path / "w1"),
        pool_size=32,
        vae_steps=2,
        vae_batch=4,
        unet_steps=6,
        batch=4,
        eval_every=6,
        eval_images=2,
        target_auc=None,
    )
    pretrain(base, command="trainers pretrain-toyworld (first)")
    cont = PretrainConfig(
        out=str(tmp_path / "m2"),
        work_dir=str(tmp_path / "w2"),
        pool_size=32,
        unet_steps=4,
        batch=4,
        eval_every=4,
        eval_images=2,
        target_auc=None,
        init_from=str(tmp_path / "m1"),
        loss_weighting="v",
        sample_every=4,  # one grid during training (step 4) and the final one
        sample_steps=4,
        lr_schedule="cosine",
    )
    info = pretrain(cont, command="trainers pretrain-toyworld (second)")
    from trainers.toyworld.pretrain import learning_rate

    opt_state = torch.load(tmp_path / "w2" / "unet_ckpt.pt", weights_only=False)["opt"]
    assert opt_state["param_groups"][0]["lr"] == pytest.approx(
        learning_rate(cont, 3)
    )  # the schedule was applied
    assert learning_rate(cont, 3) < cont.lr
    assert info["steps"] == 4 and info["continued_from"]["steps"] == 6
    assert info["continued_from"]["hardware"] == info["hardware"]  # the card names each run's machine
    assert info["continued_from"]["commands"] == ["trainers pretrain-toyworld (first)"]
    grids = sorted(p.name for p in (tmp_path / "w2").glob("samples-*.png"))
    assert grids == ["samples-000004.png", "samples-final.png"]
    assert not (tmp_path / "w2" / "vae").exists()  # stage 1 skipped
    with pytest.raises(ValueError, match="drop one"):
        PretrainConfig(init_from="toyworld", vae_from="toyworld")
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / m / "vae" / "diffusion_pytorch_model.safetensors") for m in ("m1", "m2"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from trainers.toyworld.quality import training_runs

    runs = training_runs(json.loads((tmp_path / "m2" / "training.json").read_text()))
    assert [r["steps"] for r in runs] == [6, 4]
    from trainers.toyworld.quality import _run_line

    assert "AdamW 0.0003 constant" in _run_line(1, runs[0], 0)
    assert "AdamW 0.0003 cosine to 5% of it" in _run_line(2, runs[1], 6)

    # --vae-from: the same VAE under a new, differently sized UNet, and no continuation chain on the card
    fresh = PretrainConfig(
        out=str(tmp_path / "m3"),
        work_dir=str(tmp_path / "w3"),
        pool_size=32,
        unet_steps=2,
        batch=4,
        eval_every=2,
        eval_images=2,
        target_auc=None,
        vae_from=str(tmp_path / "m1"),
        unet_channels="16,24,32",
    )
    info3 = pretrain(fresh, command="trainers pretrain-toyworld (third)")
    assert "continued_from" not in info3 and not (tmp_path / "w3" / "vae").exists()
    c = load_file(tmp_path / "m3" / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a)
    unet3 = json.loads((tmp_path / "m3" / "unet" / "config.json").read_text())
    assert unet3["block_out_channels"] == [16, 24, 32]
    run3 = training_runs(json.loads((tmp_path / "m3" / "training.json").read_text()))
    assert len(run3) == 1 and "on the VAE of `--vae-from" in _run_line(1, run3[0], 0)
    assert "batch 4," in _run_line(1, run3[0], 0)
    from trainers.toyworld.quality import write_card

    fig = {"iou": 0.5, "per_image_iou": 0.5}  # the quality figures are not what this checks
    write_card(
        tmp_path / "m3",
        {
            "auc": 0.9,
            "auc_unnormalized": 0.9,
            "gmm": fig,
            "otsu_gray": fig,
            "grabcut": fig,
            "auc_per_concept": {"circle": 0.95, "star": 0.512},
        },
        2,
    )
    card = (tmp_path / "m3" / "README.md").read_text()
    assert "| attention pixel AUC-ROC per concept | circle 0.950, star 0.512 |" in card
    assert (
        f"VAE: taken unchanged from `{tmp_path / 'm1'}` (`--vae-from`)" in card
    )  # not a VAE recipe it never ran
    assert "VAE: 2 steps" not in card

    # --freeze-text-encoder: the UNet trains alone; the text encoder is exported exactly as --init-from had it
    frozen = PretrainConfig(
        out=str(tmp_path / "m4"),
        work_dir=str(tmp_path / "w4"),
        pool_size=32,
        unet_steps=3,
        batch=4,
        eval_every=3,
        eval_images=2,
        target_auc=None,
        init_from=str(tmp_path / "m1"),
        freeze_text_encoder=True,
    )
    pretrain(frozen, command="trainers pretrain-toyworld (fourth)")
    t1, t4 = (load_file(tmp_path / m / "text_encoder" / "model.safetensors") for m in ("m1", "m4"))
    assert t1.keys() == t4.keys() and all(torch.equal(t1[k], t4[k]) for k in t1)
    u1, u4 = (load_file(tmp_path / m / "unet" / "diffusion_pytorch_model.safetensors") for m in ("m1", "m4"))
    assert not all(torch.equal(u1[k], u4[k]) for k in u1)
    run4 = training_runs(json.loads((tmp_path / "m4" / "training.json").read_text()))
    assert "text encoder frozen" in _run_line(2, run4[-1], 6)
    frozen.unet_steps, frozen.freeze_text_encoder = (
        4,
        False,
    )  # a resume must train what its checkpoint trained
    with pytest.raises(ValueError, match="resume it the same way"):
        pretrain(frozen)
    with pytest.raises(ValueError, match="needs --init-from"):
        PretrainConfig(freeze_text_encoder=True)

    # --text-encoder-from: one model's UNet continues under another model's text encoder (here m2's, which its
    # joint training moved away from m1's), exported unchanged when frozen
    swapped = PretrainConfig(
        out=str(tmp_path / "m5"),
        work_dir=str(tmp_path / "w5"),
        pool_size=32,
        unet_steps=2,
        batch=4,
        eval_every=2,
        eval_images=2,
        target_auc=None,
        init_from=str(tmp_path / "m1"),
        text_encoder_from=str(tmp_path / "m2"),
        freeze_text_encoder=True,
    )
    pretrain(swapped, command="trainers pretrain-toyworld (fifth)")
    t2, t5 = (load_file(tmp_path / m / "text_encoder" / "model.safetensors") for m in ("m2", "m5"))
    assert all(torch.equal(t2[k], t5[k]) for k in t2) and not all(torch.equal(t1[k], t2[k]) for k in t1)
    run5 = training_runs(json.loads((tmp_path / "m5" / "training.json").read_text()))
    assert [r["steps"] for r in run5] == [6, 2]  # the UNet's lineage
    assert f"under the text encoder of `--text-encoder-from {tmp_path / 'm2'}`" in _run_line(2, run5[-1], 6)
    write_card(
        tmp_path / "m5",
        {"auc": 0.9, "auc_unnormalized": 0.9, "gmm": fig, "otsu_gray": fig, "grabcut": fig},
        2,
    )
    card = (tmp_path / "m5" / "README.md").read_text()
    assert (
        "- text encoder + UNet jointly, the UNet alone in the 1 run(s) with the text encoder frozen: 8 steps"
        in card
    )
    with pytest.raises(ValueError, match="needs --init-from"):
        PretrainConfig(text_encoder_from="toyworld")


def test_lr_schedule():
    from trainers.toyworld.pretrain import learning_rate

    const = PretrainConfig(lr=1e-3, unet_steps=100)
    assert all(learning_rate(const, s) == 1e-3 for s in (0, 50, 100))
    cos = PretrainConfig(lr=1e-3, unet_steps=100, lr_schedule="cosine")
    lrs = [learning_rate(cos, s) for s in range(101)]
    assert (
        lrs[0] == pytest.approx(1e-3)
        and lrs[100] == pytest.approx(5e-5)
        and lrs[50] == pytest.approx(5.25e-4)
    )
    assert all(b <= a for a, b in zip(lrs, lrs[1:], strict=False))
    assert learning_rate(cos, 150) == pytest.approx(
        5e-5
    )  # past the end (a run extended by resume) stays at the floor
    with pytest.raises(ValueError, match="--lr-schedule"):
        PretrainConfig(lr_schedule="linear")


def test_unet_size_options(tmp_path):
    """--unet-channels / --unet-layers grow (or shrink) a new UNet; bad values fail before any rendering."""
    from transformers import CLIPTokenizer

    from factory.toyworld import model as tw
    from factory.toyworld.tokenizer import write_clip_tokenizer
    from factory.toyworld.world import vocabulary
    from trainers.toyworld.pretrain import render_pool, train_unet

    for bad, match in (
        ("30,64,64", "multiple of 8"),
        ("64,128", "3 block widths"),
        ("a,b,c", "comma-separated"),
    ):
        with pytest.raises(ValueError, match=match):
            PretrainConfig(unet_channels=bad)
    with pytest.raises(ValueError, match="unet-layers"):
        PretrainConfig(unet_layers=0)

    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path / "tok", vocabulary(), 16))
    cfg = PretrainConfig(
        work_dir=str(tmp_path),
        unet_channels="16,24,32",
        unet_layers=2,
        unet_steps=3,
        batch=4,
        eval_every=10**6,
        ckpt_every=10**6,
        target_auc=None,
    )
    unet, _, info = train_unet(cfg, tw.build_vae().eval(), tok, render_pool(8), tmp_path, None)
    assert tuple(unet.config.block_out_channels) == (16, 24, 32) and unet.config.layers_per_block == 2
    assert info["steps"] == 3 and np.isfinite(info["loss_curve"]).all()

    # continuing an exported model keeps its UNet: a size option alongside --init-from is a mistake, refused
    # at config time like the others
    for extra in ({"unet_channels": "64,128,128"}, {"unet_layers": 2}):
        with pytest.raises(ValueError, match="drop them"):
            PretrainConfig(init_from="toyworld", **extra)


def test_throughput_benchmark_runs(capsys):
    """The steps/s benchmark times the real train_unet, one row per batch size (figures, not asserted)."""
    from trainers.toyworld.pretrain_bench import main

    main(["--steps", "2", "--batches", "2,4", "--unet-channels", "16,24,32", "--pool-size", "8"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["batch"] for r in summary["results"]] == [2, 4]
    assert all(
        r["steps"] == 2 and r["steps_s"] > 0 and r["samples_s"] == pytest.approx(r["batch"] * r["steps_s"])
        for r in summary["results"]
    )


def test_cli_parses_switches_and_optional_values(monkeypatch):
    """`--freeze-text-encoder` is a switch (bool("False") would be True); 'none' disables an optional value.
    The training itself is replaced by a recorder here: this checks the parsing only."""
    import trainers.toyworld.pretrain as tp

    seen = []
    monkeypatch.setattr(tp, "pretrain", lambda cfg, command: seen.append((cfg, command)))
    tp.main(["--init-from", "toyworld", "--freeze-text-encoder", "--target-auc", "none", "--lr", "6e-4"])
    tp.main(["--init-from", "toyworld"])
    (cfg, command), (plain, _) = seen
    assert (
        cfg.freeze_text_encoder and cfg.target_auc is None and cfg.lr == 6e-4 and cfg.init_from == "toyworld"
    )
    assert command.endswith("--freeze-text-encoder --target-auc none --lr 6e-4")
    assert not plain.freeze_text_encoder and plain.target_auc == PretrainConfig().target_auc
