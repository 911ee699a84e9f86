"""The `concept_output` readout (ConceptAttention) on tiny random FLUX.1 and FLUX.2 (klein, dev) pipelines
with two double-stream and two single-stream blocks (`tests/tiny_models.py`): it equals a naive full
computation, leaves the image bit for bit as it is, records only the chosen blocks and the recorded steps,
restores the model, finds multi-word concepts, and is refused where it is not served, before any model
work."""

from types import SimpleNamespace

import pytest
import torch
from naive_attention import naive_concept_output, naive_concept_output_flux2, naive_concept_output_z_image
from tiny_models import BUILDERS, flux_pipeline

from factory import Concept, DistillConfig, Distiller, SampleSpec
from factory.method.attention import attention_processors
from factory.method.concept_attention import recorded_blocks
from factory.method.families import UnsupportedFamilyError, detect_family
from factory.method.prompts import ConceptTokenError
from factory.method.readouts import Readout
from factory.method.schedulers import make_scheduler
from factory.method.synthesis import synthesize_latents
from factory.registry import UnknownChoiceError

FAST = DistillConfig(num_inference_steps=4, probe_t0=3, inpaint_steps=4, readout="concept_output")


@pytest.fixture(scope="module")
def flux():
    return flux_pipeline(num_layers=2, num_single_layers=2)


@pytest.fixture(scope="module", params=["flux", "flux2_klein", "flux2_dev", "z_image"])
def tiny(request, flux):
    if request.param == "z_image":
        return BUILDERS["z_image"](num_layers=4)
    return flux if request.param == "flux" else BUILDERS[request.param](num_layers=2, num_single_layers=2)


def _streams(family, words, background=("background", "floor")):
    return family.concept_streams(words, background)


def test_the_map_equals_a_naive_full_computation(tiny):
    family = detect_family(tiny)
    denoiser = family.denoiser()
    prompts = ["a photo of a fire truck", "a photo of a star"]
    cond = family.encode(prompts)
    streams = _streams(family, [["fire", "truck"], ["star"]])
    z = torch.randn(2, denoiser.in_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(700.0)
    weights = family.token_weights(prompts, [["fire", "truck"], ["star"]])
    # the double-stream blocks (0, 1), then the single-stream ones (2, 3): the words run through every
    # block up to the last recorded, each block's own weights for them
    for layers in [(0, 1), (1,), (0,), (2,), (3,), (1, 2, 3)]:
        readout = Readout(
            "concept_output", layers=layers, background_words=("background", "floor"), streams=streams
        )
        # the map's size: FLUX's 8 x 8 tokens here; Z-Image's capture takes the latent side, as the
        # Distiller gives it, and upsamples its tokens' map to it
        size = 16 if family.name == "z_image" else 8
        with torch.no_grad(), denoiser.capture(weights, size, readout=readout) as acc:
            denoiser(z, t, cond)
        assert acc.count == len(layers)
        got = acc.mean()

        inputs, module = [], family.denoiser_module
        blocks = (
            module.layers
            if family.name == "z_image"
            else [*module.transformer_blocks, *module.single_transformer_blocks]
        )
        hooks = [  # each block's inputs: Z-Image's layers take them by position, FLUX's by keyword
            b.register_forward_pre_hook(lambda m, a, kw, keep=inputs: keep.append(a or kw), with_kwargs=True)
            for b in blocks
        ]
        try:
            with torch.no_grad():
                denoiser(z, t, cond)
                if family.name == "z_image":
                    ref = naive_concept_output_z_image(
                        module, inputs, streams.tokens, streams.groups, streams.positions, 64, layers
                    )
                elif family.name == "flux":
                    ref = naive_concept_output(
                        family.denoiser_module,
                        inputs,
                        streams.tokens,
                        streams.groups,
                        timestep=torch.full((2,), 0.7),
                        guidance=torch.full((2,), family.guidance),
                        layers=layers,
                    )
                else:
                    ref = naive_concept_output_flux2(
                        family.denoiser_module,
                        inputs,
                        streams.tokens,
                        streams.groups,
                        streams.positions,
                        layers,
                    )
        finally:
            for h in hooks:
                h.remove()
        ref = torch.nn.functional.interpolate(ref.view(2, 1, 8, 8), size=size, mode="nearest")[:, 0]
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
        assert ((got > 0) & (got < 1)).all() and got.std() > 1e-3  # a softmax over three words, not flat


def test_either_readout_leaves_the_image_bit_for_bit_and_the_model_restored(tiny):
    family = detect_family(tiny)
    denoiser = family.denoiser()
    module = denoiser.module
    processors = attention_processors(module)
    cond = family.encode(["a photo of a star"])
    weights = family.token_weights(["a photo of a star"], [["star"]])
    runs = {}
    readouts = {"off": None, "image_to_text": Readout(), "concept_output": None}
    readouts["concept_output"] = Readout("concept_output", streams=_streams(family, [["star"]]))
    for name, readout in readouts.items():
        gens = [torch.Generator().manual_seed(3)]
        runs[name] = synthesize_latents(
            denoiser,
            make_scheduler("ddim", family.schedule_config(family.pipe.scheduler, 32, 4)),
            shape=(4, 16, 16),
            cond_emb=cond,
            token_weights=weights,
            generators=gens,
            num_inference_steps=4,
            capture_t0=2,
            capture=readout is not None,
            readout=readout,
        )
    for name in ("image_to_text", "concept_output"):
        assert torch.equal(runs[name][0], runs["off"][0]), f"{name}: the image is the image without capture"
        assert runs[name][1].shape == (1, 16, 16)
    assert runs["off"][1] is None and not torch.equal(runs["image_to_text"][1], runs["concept_output"][1])
    assert attention_processors(module) == processors  # the same processor objects back
    hooked = [module, *[b.attn.to_out[0] for b in getattr(module, "transformer_blocks", [])]]
    assert not any(m._forward_pre_hooks for m in hooked), "no hook left behind"


def test_multi_word_concepts_keep_every_token(flux):
    family = detect_family(flux)
    streams = _streams(family, [["fire", "truck"], ["star"]], background=("background",))
    tok = flux.tokenizer_2
    n_fire_truck = len(tok("fire", add_special_tokens=False)["input_ids"]) + len(
        tok("truck", add_special_tokens=False)["input_ids"]
    )
    n_background = len(tok("background", add_special_tokens=False)["input_ids"])
    concept = streams.groups[0, :, 0]
    assert int((concept > 0).sum()) == n_fire_truck and concept.sum().item() == pytest.approx(1.0)
    assert streams.groups[0, :, 1].sum().item() == pytest.approx(1.0)
    assert int(streams.key_mask[0].sum()) == n_fire_truck + n_background
    assert int(streams.key_mask[1].sum()) < int(streams.key_mask[0].sum())  # the shorter row is padded
    assert streams.positions is None  # FLUX.1's text positions are all zero


@pytest.mark.parametrize("build", ["flux2_klein", "flux2_dev"])
def test_flux2_words_keep_their_tokens_and_text_positions(build):
    family = detect_family(BUILDERS[build](num_layers=2))
    streams = _streams(family, [["fire", "truck"], ["star"]], background=("background",))
    for r, words in enumerate([["fire", "truck"], ["star"]]):
        at = 0
        for w, group in enumerate([words, ["background"]]):
            for word in group:
                # the word's tokens and positions in its own templated prompt, as the prompt's are found
                where = family.token_weights([word], [[word]])[0].nonzero()[:, 0]
                assert torch.equal(streams.positions[r, at : at + len(where)], where)
                assert (streams.groups[r, at : at + len(where), w] > 0).all()
                at += len(where)
        assert int(streams.key_mask[r].sum()) == at and at > 0
    assert streams.positions[streams.key_mask].min() > 0  # after the chat template's opening tokens
    # the default blocks: the last three double-stream blocks (5-7 of FLUX.2-dev's eight), all of two here
    dev = SimpleNamespace(
        transformer_blocks=[None] * 8,
        config=SimpleNamespace(num_single_layers=48, timestep_guidance_channels=1),
    )
    assert recorded_blocks(dev, Readout("concept_output")) == [5, 6, 7]
    assert recorded_blocks(family.denoiser_module, Readout("concept_output")) == [0, 1]


def test_the_distiller_makes_triplets_with_it(tiny):
    [t] = Distiller("tiny", pipeline=tiny, config=FAST).synthesize([SampleSpec(Concept("star"), 0)])
    assert t.image.shape == (32, 32, 3) and t.mask.shape == (32, 32)
    plain = DistillConfig(num_inference_steps=4, probe_t0=3, inpaint_steps=4)
    [u] = Distiller("tiny", pipeline=tiny, config=plain).synthesize([SampleSpec(Concept("star"), 0)])
    assert (t.image == u.image).all(), "the readout changes the map, never the image"


def test_it_is_refused_where_not_served(flux, toyworld_pipe):
    with pytest.raises(UnsupportedFamilyError, match="readout 'concept_output' is not served for a sd model"):
        Distiller("toyworld", pipeline=toyworld_pipe, config=FAST)
    with pytest.raises(ConceptTokenError, match="no tokens of its own"):
        Distiller(
            "tiny-flux", pipeline=flux, config=DistillConfig(readout="concept_output", background_words=("",))
        )
    with pytest.raises(ValueError, match="beyond this transformer's 2 double-stream and 2 single-stream"):
        cfg = DistillConfig(num_inference_steps=4, probe_t0=3, readout="concept_output", readout_layers=(4,))
        Distiller("tiny-flux", pipeline=flux, config=cfg).synthesize([SampleSpec(Concept("star"), 0)])
    with pytest.raises(ValueError, match="compile: true serves the image_to_text readout only"):
        Distiller("tiny-flux", pipeline=flux, config=DistillConfig(readout="concept_output", compile=True))
    with pytest.raises(UnknownChoiceError, match="choose one of image_to_text, concept_output"):
        DistillConfig(readout="daam")


def test_image_to_text_records_only_the_chosen_layers(flux):
    family = detect_family(flux)
    denoiser = family.denoiser()
    cond = family.encode(["a photo of a star"])
    weights = family.token_weights(["a photo of a star"], [["star"]])
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    maps = {}
    for layers in [None, (0,), (1,), (2,), (3,)]:  # every block (2 double + 2 single), then each alone
        with torch.no_grad(), denoiser.capture(weights, 8, readout=Readout(layers=layers)) as acc:
            denoiser(z, torch.tensor(500.0), cond)
        maps[layers] = (int(acc.count), acc.mean())
    assert [count for count, _ in maps.values()] == [4, 1, 1, 1, 1]
    assert not torch.allclose(maps[(0,)][1], maps[(2,)][1])
    torch.testing.assert_close(maps[None][1], sum(maps[(i,)][1] for i in range(4)) / 4)


def test_the_job_config_and_the_preflight_take_the_readout(tmp_path):
    from factory.dataset.config import load_config
    from factory.dataset.preflight import check_model
    from factory.yaml_config import ConfigError

    base = [f"output.uri={tmp_path}", "sampler.steps=4", "sampler.probe_t0=3"]
    cfg = load_config(
        "configs/toyworld.yaml",
        [
            *base,
            "sampler.readout=concept_output",
            "sampler.readout_layers=[0]",
            "sampler.background_words=[sky]",
        ],
    )
    d = cfg.distill_config()
    assert (d.readout, d.readout_layers, d.background_words) == ("concept_output", (0,), ("sky",))
    with pytest.raises(UnsupportedFamilyError, match="readout 'concept_output' is not served for a sd model"):
        check_model(cfg)  # toyworld is SD-like: refused before Ray starts
    with pytest.raises(ConfigError, match="readout"):
        load_config("configs/toyworld.yaml", [*base, "sampler.readout=daam"])


# A FLUX.1-dev architecture shrunk to test size by `--arch-set`-style overrides: what `factory bench
# --model flux-arch --capture-only` runs, depth-reduced only, on a CPU (docs/benchmarks.md).
TINY_FLUX_ARCH = {
    "transformer": {
        "num_layers": 2,
        "num_single_layers": 1,
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "axes_dims_rope": [4, 4, 8],
        "joint_attention_dim": 32,
        "pooled_projection_dim": 32,
    },
    "text_encoder": {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "projection_dim": 32,
    },
    "text_encoder_2": {"d_model": 32, "d_ff": 64, "num_layers": 1, "num_heads": 2, "d_kv": 16},
    "vae": {
        "block_out_channels": [8, 8],
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        "norm_num_groups": 4,
        "layers_per_block": 1,
    },
}


def test_the_bench_times_each_readouts_capture_on_flux_arch(tmp_path):
    import json

    from factory.bench import arch_overrides, bench, format_table, summary_table

    r = bench(
        "flux-arch", steps=2, repeats=1, resolution=32, arch_overrides=TINY_FLUX_ARCH, capture_only=True
    )
    assert r["settings"]["family"] == "flux" and r["settings"]["arch_overrides"] == TINY_FLUX_ARCH
    assert set(r["capture"]["by_readout"]) == {"image_to_text", "concept_output"}
    assert r["capture"]["overhead"] == r["capture"]["by_readout"]["image_to_text"]
    assert len(r["raw_s"]["loop_concept_output"]) == len(r["raw_s"]["loop_off"]) == 2
    assert "readout concept_output" in format_table(r) and "plain" not in format_table(r)
    (tmp_path / "flux-arch-capture.json").write_text(json.dumps(r))
    [row] = summary_table(tmp_path).splitlines()[2:]
    assert row.startswith("| flux-arch-capture | flux-arch |") and "concept_output" in row
    assert arch_overrides(["transformer.num_layers=2", "transformer.axes_dims_rope=[4, 4, 8]"]) == {
        "transformer": {"num_layers": 2, "axes_dims_rope": [4, 4, 8]}
    }
