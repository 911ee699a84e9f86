"""The toyworld DiT (FLUX.1 architecture): its pretraining recipe for a few steps (finite loss, a checkpoint
that resumes, an export that `FluxPipeline` loads and the `flux` family serves at 64 px)."""

import json

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from factory import Concept, DistillConfig, Distiller, SampleSpec
from factory.method.families import detect_family
from trainers.toyworld.pretrain_dit import DiTPretrainConfig, pretrain_dit


def tiny_run(folder, **over) -> DiTPretrainConfig:
    """A few steps of the recipe on a 64-render pool, exported to folder/model, its work dir folder/work."""
    return DiTPretrainConfig(
        out=str(folder / "model"), work_dir=str(folder / "work"), pool_size=64, batch=4, eval_images=2, **over
    )


@pytest.mark.training
def test_the_dit_recipe_trains_resumes_and_exports_a_flux_pipeline(tmp_path):
    torch.set_num_threads(2)
    small = dict(width=32, heads=2, double_layers=1, single_layers=1)
    cfg = tiny_run(tmp_path, steps=6, warmup=2, eval_every=6, ckpt_every=3, **small)
    info = pretrain_dit(cfg, command="first")
    assert info["steps"] == 6 and len(info["history"]) == 1
    assert np.isfinite(info["history"][0]["loss"]) and 0.0 <= info["history"][0]["auc"] <= 1.0
    ckpt = torch.load(tmp_path / "work" / "dit_ckpt.pt", weights_only=False)
    assert ckpt["step"] == 6 and ckpt["done"]
    cfg.steps = 8  # resume: continues from step 6
    info2 = pretrain_dit(cfg, command="second")
    assert info2["steps"] == 8 and [h["step"] for h in info2["history"]] == [6, 8]
    assert json.loads((tmp_path / "model" / "training.json").read_text())["commands"] == ["first", "second"]
    assert "FLUX.1-architecture" in (tmp_path / "model" / "README.md").read_text()  # its model card

    pipe = FluxPipeline.from_pretrained(tmp_path / "model", local_files_only=True)
    family = detect_family(pipe)
    assert family.name == "flux" and family.native_resolution() == 64 and pipe.vae.config.shift_factor == 0.0
    assert not pipe.transformer.config.guidance_embeds
    # the parent's CLIP is kept as it was (frozen): FLUX's pooled vector
    parent = detect_family(pipe).pipe.text_encoder.state_dict()
    from transformers import CLIPTextModel

    from factory.method.loading import SHORT_NAMES

    shipped = CLIPTextModel.from_pretrained(SHORT_NAMES["toyworld"] / "text_encoder").state_dict()
    assert all(torch.equal(parent[k], shipped[k]) for k in shipped)
    d = Distiller(str(tmp_path / "model"), config=DistillConfig(4, 3, inpaint_steps=4))
    [t] = d.synthesize([SampleSpec(Concept("star"), 0)])
    assert t.image.shape == (64, 64, 3) and t.meta["family"] == "flux"

    # both readouts side by side on a labelled split (trainers readout-sweep), one row per setting
    from factory.toyworld.world import write_split
    from trainers.toyworld.readout_sweep import markdown, sweep

    split = write_split(tmp_path / "split", range(3000000000, 3000000003))
    grid = ["sampler.readout=image_to_text", "sampler.readout=concept_output;sampler.readout_layers=[0]"]
    fast = ["sampler.steps=4", "sampler.probe_t0=3", "inpaint.steps=4"]
    rows = sweep(str(tmp_path / "model"), str(split), grid, fast, batch=3)
    assert [r["setting"] for r in rows] == grid and all(0 <= r["attention_auc"] <= 1 for r in rows)
    assert rows[1]["config"]["readout"] == "concept_output" and tuple(
        rows[1]["config"]["readout_layers"]
    ) == (0,)
    assert markdown(rows).count("\n") == 2 + len(grid)

    # training goes on from the export (fresh optimizer, cosine schedule); the card tells both runs
    shipped_weights = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    go_on = tiny_run(
        tmp_path / "on",
        init_from=str(tmp_path / "model"),
        lr_schedule="cosine",
        steps=2,
        warmup=1,
        eval_every=2,
    )
    info3 = pretrain_dit(go_on, command="third")
    earlier = info3["continued_from"]
    assert earlier["steps"] == 8 and earlier["commands"] == ["first", "second"]
    card = (tmp_path / "on" / "model" / "README.md").read_text()
    assert "`first`" in card and "`third`" in card and "| 2 | 10 |" in card and "10 steps in all" in card
    trained = FluxPipeline.from_pretrained(tmp_path / "on" / "model", local_files_only=True)
    trained = trained.transformer.state_dict()
    assert any(not torch.equal(trained[k], shipped_weights[k]) for k in shipped_weights)
    assert all(trained[k].shape == shipped_weights[k].shape for k in shipped_weights)


def test_going_on_from_a_model_that_is_not_a_dit_is_a_clear_error_before_any_work(tmp_path):
    from trainers.toyworld.pretrain import scheduled_lr

    cfg = DiTPretrainConfig(out=str(tmp_path / "m"), work_dir=str(tmp_path / "w"), init_from="toyworld")
    with pytest.raises(ValueError, match="not an exported toyworld DiT"):
        pretrain_dit(cfg)
    assert not (tmp_path / "w").exists()  # nothing rendered, nothing written
    resized = DiTPretrainConfig(out=str(tmp_path / "m"), init_from="toyworld-dit", width=256)
    with pytest.raises(ValueError, match="--width are for a new model"):
        pretrain_dit(resized)
    same = DiTPretrainConfig(out="factory/models/toyworld-dit", init_from="toyworld-dit")
    with pytest.raises(ValueError, match="own directory: export to a new one"):
        pretrain_dit(same)
    assert scheduled_lr(1.0, "cosine", 0, 10) == 1.0
    assert scheduled_lr(1.0, "cosine", 10, 10) == pytest.approx(0.05)
    assert scheduled_lr(1.0, "constant", 7, 10) == 1.0


def test_a_dit_export_with_another_t5_vocabulary_fails_before_the_pool_is_rendered(tmp_path, monkeypatch):
    import shutil

    from transformers import T5Config, T5EncoderModel

    import trainers.toyworld.pretrain_dit as recipe
    from factory.method.loading import SHORT_NAMES

    # the shipped DiT, its T5 swapped for one over a 10-token vocabulary
    other = tmp_path / "other"
    shutil.copytree(SHORT_NAMES["toyworld-dit"], other)
    shutil.rmtree(other / "text_encoder_2")
    tiny = T5Config(
        vocab_size=10, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2, is_encoder_decoder=False
    )
    T5EncoderModel(tiny).save_pretrained(other / "text_encoder_2")

    def rendered(*args, **kwargs):
        raise AssertionError("the pool was rendered before the T5 was checked")

    monkeypatch.setattr(recipe, "render_pool", rendered)
    cfg = tiny_run(tmp_path, init_from=str(other), steps=2)
    with pytest.raises(ValueError, match="its T5 has 10 tokens.*it is not a toyworld DiT"):
        pretrain_dit(cfg)


def test_the_shipped_dit_loads_as_flux_and_draws_at_64_px():
    from factory.method.loading import SHORT_NAMES, load_pipeline, model_geometry

    path = SHORT_NAMES["toyworld-dit"]
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size < 60e6  # the bound for a shipped model
    pipe = FluxPipeline.from_pretrained(path, local_files_only=True)
    assert load_pipeline("toyworld-dit").transformer.config == pipe.transformer.config
    family = detect_family(pipe)
    assert (
        family.name == "flux"
        and family.native_resolution() == 64
        and model_geometry("toyworld-dit") == (64, 4)
    )
    # every concept is one T5 token; a word outside the grammar is refused for the concept_output streams
    w = family.token_weights(["a photo of a heart"], [["heart"]])
    assert w.sum() == 1 and w[0, 4] == 1
    from factory.method.prompts import ConceptTokenError

    with pytest.raises(ConceptTokenError, match="unicorn"):
        family.concept_streams([["unicorn"]], ("background",))
    card = (path / "README.md").read_text()
    assert "## Measured" in card and "concept_output" in card
