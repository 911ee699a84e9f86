"""Every served family (SD 2.x v-prediction, SDXL, SD3) on tiny random-weight pipelines built here
(`tests/tiny_models.py`): the capture equals a naive full computation, synthesis and label mode run, the
processors come back, a `factory generate` job writes shards; v-prediction and the flow are followed; an
unsupported family is refused by name. Toyworld (SD 1.x-style) has the same checks in its own test files.
"""

import json

import numpy as np
import pytest
import torch
from naive_attention import (
    StoreCrossAttention,
    StoreFlux2Attention,
    StoreFluxAttention,
    StoreJointAttention,
    StoreZImageAttention,
    naive_map,
)
from tiny_models import BUILDERS, FAMILY_OF

from factory import Concept, DistillConfig, Distiller, SampleSpec
from factory.method.attention import (
    AttentionAccumulator,
    attention_processors,
    cross_attention_names,
    set_attention_processors,
)
from factory.method.families import (
    FAMILIES,
    UnsupportedFamilyError,
    detect_family,
    family_name_of_index,
)
from factory.method.inpaint import inpaint_background
from factory.method.probe import mean_attention_map
from factory.method.schedulers import is_flow
from factory.method.synthesis import synthesize_latents

FAST = DistillConfig(num_inference_steps=6, probe_t0=4, inpaint_steps=6)


@pytest.fixture(scope="module", params=list(BUILDERS))
def tiny(request):
    return request.param, BUILDERS[request.param]()


# --- the capture equals a naive full computation ------------------------------------------------------
def test_capture_equals_naive_full_computation_and_keeps_the_output(tiny):
    build, pipe = tiny
    family = detect_family(pipe)
    assert family.name == FAMILY_OF[build]
    denoiser = family.denoiser()
    prompts = ["a photo of a star", "a photo of a red ring on a striped background"]
    words = [["star"], ["red", "ring"]]
    cond = family.encode(prompts)
    w = family.token_weights(prompts, words)
    assert w.shape[1] == cond.hidden.shape[1] and w.sum(1).tolist() == [1, 2]
    z = torch.randn(2, denoiser.in_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    ts = [torch.tensor(781), torch.tensor(21)]
    if is_flow(pipe.scheduler):
        ts = [torch.tensor(900.0), torch.tensor(20.0)]
    with torch.no_grad(), denoiser.capture(w, 16) as acc:
        outs = [denoiser(z, t, cond) for t in ts]
    got = acc.mean()
    if is_flow(pipe.scheduler):  # the DiTs' capture runs their processors' own steps: the same bits
        with torch.no_grad():
            plain = [denoiser(z, t, cond) for t in ts]
        assert all(torch.equal(a, b) for a, b in zip(outs, plain, strict=True))

    module = family.denoiser_module
    original = attention_processors(module)
    store = []
    if build == "flux":
        naive = StoreFluxAttention(store, n_text=w.shape[1])
    elif build.startswith("flux2"):
        naive = StoreFlux2Attention(store, n_text=w.shape[1])
    elif build == "z_image":  # 8 x 8 image tokens (already a multiple of 32), then the caption
        naive = StoreZImageAttention(store, n_img=64, start=64, width=w.shape[1])
    else:
        naive = StoreJointAttention(store) if is_flow(pipe.scheduler) else StoreCrossAttention(store)
    names = set(cross_attention_names(module))
    set_attention_processors(module, {n: (naive if n in names else p) for n, p in original.items()})
    try:
        with torch.no_grad():
            outs_naive = [denoiser(z, t, cond) for t in ts]
    finally:
        set_attention_processors(module, original)
    assert acc.count == len(store) == 2 * len(names) > 0
    torch.testing.assert_close(got, naive_map(store, w, 16), rtol=1e-5, atol=1e-7)
    for a, b in zip(outs, outs_naive, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert attention_processors(module) == original  # restored, the same objects


def test_z_image_capture_masks_the_batch_padding_of_captions_of_different_lengths():
    """Z-Image pads each caption to a multiple of 32 tokens and the batch to the longest: a caption of over
    32 tokens beside a short one makes the key mask, which the capture must apply as the model does."""
    from tiny_models import z_image_pipeline

    pipe = z_image_pipeline()
    family = detect_family(pipe)
    long = "a photo of a red ring on a striped background" + " on a dotted background" * 5
    prompts, words = ["a photo of a star", long], [["star"], ["ring"]]
    cond = family.encode(prompts)
    assert cond.mask.sum(1).tolist()[0] <= 32 < cond.mask.sum(1).tolist()[1]  # two lengths after padding
    w = family.token_weights(prompts, words)
    denoiser = family.denoiser()
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), denoiser.capture(w, 16) as acc:
        out = denoiser(z, torch.tensor(500.0), cond)
    module, store = family.denoiser_module, []
    original = attention_processors(module)
    naive = StoreZImageAttention(store, n_img=64, start=64, width=w.shape[1])
    names = set(cross_attention_names(module))
    set_attention_processors(module, {n: (naive if n in names else p) for n, p in original.items()})
    try:
        with torch.no_grad():
            out_naive = denoiser(z, torch.tensor(500.0), cond)
    finally:
        set_attention_processors(module, original)
    torch.testing.assert_close(acc.mean(), naive_map(store, w, 16), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out, out_naive, rtol=1e-4, atol=1e-5)
    # each sample's map is its own: alone in a batch it is the same
    with torch.no_grad(), denoiser.capture(w[1:], 16) as alone:
        denoiser(z[1:], torch.tensor(500.0), family.encode(prompts[1:]))
    torch.testing.assert_close(alone.mean()[0], acc.mean()[1], rtol=1e-4, atol=1e-6)
    assert prompts[0] == "a photo of a star"  # the pipeline templates the list it is given: ours is a copy
    # the concept_output words: each word's own caption tokens, at their positions in its templated prompt
    streams = family.concept_streams([["star"]], ("background",))
    for w, word in enumerate(["star", "background"]):
        where = family.token_weights([word], [[word]])[0].nonzero()[:, 0]
        assert torch.equal(streams.positions[0][streams.groups[0, :, w] > 0], where)


@pytest.mark.parametrize("build", ["flux2_klein", "flux2_dev"])
def test_flux2_calls_its_transformer_and_vae_as_its_pipeline_does(build):
    """FLUX.2's denoiser is the pipeline's packing, four-axis ids and timestep, bit for bit; the method's
    latents are the pipeline's batch-norm-normalized patches laid out as cells; the shift is the pipeline's
    `compute_empirical_mu` for each sampler's own step count."""
    import math

    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    pipe = BUILDERS[build]()
    family = detect_family(pipe)
    # FLUX.2-dev's guidance embedding gets the pipeline's default guidance_scale; klein has none
    guidance = torch.full([2], 4.0) if build == "flux2_dev" else None
    assert pipe.transformer.config.guidance_embeds == (guidance is not None)
    prompts = ["a photo of a star", "a photo of a red ring on a striped background"]
    cond = family.encode(prompts)
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(700.0)
    with torch.no_grad():
        got = family.denoiser()(z, t, cond)
        patches = pipe._patchify_latents(z)
        ids = pipe._prepare_latent_ids(patches)
        _, text_ids = pipe.encode_prompt(prompts, device="cpu")
        out = pipe.transformer(
            hidden_states=pipe._pack_latents(patches),
            timestep=t.expand(2) / 1000,
            guidance=guidance,
            encoder_hidden_states=cond.hidden,
            txt_ids=text_ids,
            img_ids=ids,
            return_dict=False,
        )[0]
        want = pipe._unpatchify_latents(pipe._unpack_latents_with_ids(out, ids))
        assert torch.equal(got, want)
        x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
        vae = family.method_vae()
        cells = vae.encode(x).latent_dist.mode()
        torch.testing.assert_close(pipe._patchify_latents(cells), pipe._encode_vae_image(x, None))
        assert cells.abs().mean() != pipe.vae.encode(x).latent_dist.mode().abs().mean()  # the stats count
        torch.testing.assert_close(vae.denormalize(cells), pipe.vae.encode(x).latent_dist.mode())
    d = Distiller(
        "tiny-flux2", pipeline=pipe, config=DistillConfig(num_inference_steps=6, probe_t0=4, inpaint_steps=20)
    )
    tokens = (32 // 2 // 2) ** 2
    assert d.sampler.config.shift == pytest.approx(math.exp(compute_empirical_mu(tokens, 6)))
    assert d.inpaint_sampler.config.shift == pytest.approx(math.exp(compute_empirical_mu(tokens, 20)))


# --- synthesis and label mode end to end --------------------------------------------------------------
def test_synthesis_and_label_mode_run_and_restore_the_processors(tiny):
    build, pipe = tiny
    module = detect_family(pipe).denoiser_module
    before = attention_processors(module)
    d = Distiller(build, pipeline=pipe, config=FAST)
    specs = [SampleSpec(Concept("star"), seed=s) for s in (1, 2)]
    out = d.synthesize(specs)
    assert d.resolution == 32 and d.latent_size == 16  # the model's own sample size x VAE factor
    for t in out:
        assert t.image.shape == (32, 32, 3) and t.mask.shape == (32, 32) and t.prelim.shape == (16, 16)
        assert np.isfinite(t.attention.astype(np.float32)).all() and t.attention.max() > 0
        assert t.meta["family"] == FAMILY_OF[build] and t.meta["concept"] == "star"
    assert out[0].meta["prediction_type"] == {"sd2": "v_prediction", "sdxl": "epsilon", "sd3": "flow"}.get(
        build, "flow"
    )
    # a sample depends on its seed, not on its batch
    (alone,) = d.synthesize(specs[1:])
    assert np.array_equal(alone.image, out[1].image) and np.array_equal(alone.mask, out[1].mask)
    guided = Distiller(build, pipeline=pipe, config=DistillConfig(**{**vars(FAST), "guidance_scale": 4.0}))
    (g,) = guided.synthesize(specs[:1])
    assert not np.array_equal(g.image, out[0].image) and g.meta["guidance_scale"] == 4.0
    photo = np.random.default_rng(0).integers(0, 255, (40, 24, 3), dtype=np.uint8)
    (lab,) = d.label([photo], Concept("ring"), seeds=[3])
    assert lab.image.shape == (40, 24, 3) and lab.mask.shape == (40, 24) and lab.meta["mode"] == "label"
    assert attention_processors(module) == before


def test_concept_tokens_are_found_in_every_tokenizer(tiny):
    build, pipe = tiny
    family = detect_family(pipe)
    assert len(family.tokenizers) == {"sdxl": 2, "sd3": 2, "flux": 2}.get(build, 1)
    w = family.token_weights(["a photo of a star"], [["star"]])
    if build in ("z_image", "flux2_klein"):  # Qwen's byte-level "Ġstar", in the chat-templated prompt
        ids = pipe.tokenizer(family.templated("a photo of a star"))["input_ids"]
        star = ids.index(pipe.tokenizer.convert_tokens_to_ids("\u0120star"))
        assert w.shape[1] == family.sequence_length and ids[0] == pipe.tokenizer.convert_tokens_to_ids(
            "<|im_start|>"
        )
    elif build == "flux2_dev":  # the ids Flux2Pipeline gives Mistral-3: the system turn, then the prompt
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input

        ids = pipe.tokenizer.apply_chat_template(
            format_input(["a photo of a star"], system_message=pipe.system_message),
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            padding="max_length",
            max_length=512,
        )["input_ids"][0].tolist()
        star = ids.index(pipe.tokenizer.tokenizer.convert_tokens_to_ids("\u0120star"))
        assert ids[:2] == pipe.tokenizer.tokenizer.convert_tokens_to_ids(["<s>", "[SYSTEM_PROMPT]"])
    else:
        star = pipe.tokenizer("a photo of a star")["input_ids"].index(
            pipe.tokenizer.convert_tokens_to_ids("star</w>")
        )
    assert w[0].nonzero().flatten().tolist() == [star]  # the same position, whatever the pad token
    if build == "sd3":
        assert w.shape[1] == pipe.tokenizer.model_max_length + family.max_sequence_length
    if build == "flux":  # T5's tokens (toyworld's CLIP tokenizer stands in for T5's here), up to its length
        assert w.shape[1] == family.sequence_length == pipe.tokenizer_2.model_max_length
    # a concept of several words counts every word's tokens, in every tokenizer
    two = family.token_weights(["a photo of a fire truck"], [["fire", "truck"]])
    assert two.sum().item() >= 2 and two.shape == w.shape
    # a concept past the text tokens that reach the model is an error, in every tokenizer, never dropped
    from factory.method.prompts import ConceptTokenError

    far = ["a photo of a " + "red " * 600 + "star"]
    with pytest.raises(ConceptTokenError, match="beyond"):
        family.token_weights(far, [["star"]])
    if build == "flux":  # a T5 tokenizer longer than the 512 tokens FLUX reads: the window is FLUX's
        pipe.tokenizer_2.model_max_length = 1024
        try:
            assert family.sequence_length == 512
            with pytest.raises(ConceptTokenError, match="beyond the model's 512"):
                family.token_weights(far, [["star"]])
        finally:
            pipe.tokenizer_2.model_max_length = 77


# --- v-prediction and the flow are followed ------------------------------------------------------------
class OracleDenoiser:
    """A test double, not a model: it returns the exact prediction (epsilon, v or flow velocity) of one
    known clean latent `x`, whatever it is given, and records the noise each input implies. A sampler that
    reads the prediction the right way follows the ODE's path to `x`: the implied noise stays what it was at
    the first step. Read the wrong way, the path bends."""

    in_channels = 4

    def __init__(self, x, scheduler, kind):
        self.x, self.scheduler, self.kind = x, scheduler, kind
        self.implied = []
        self.acc = None

    def __call__(self, z, t, cond):
        if (
            self.acc is not None and self.acc.enabled
        ):  # uniform attention over the text tokens: what the probe averages
            n_tok = self.acc.token_weights.shape[1]
            self.acc.add(torch.full((z.shape[0], z.shape[-2] * z.shape[-1], n_tok), 1 / n_tok), heads=1)
        x = self.x.expand_as(z)
        if self.kind == "flow":
            sigma = t.float() / self.scheduler.config.num_train_timesteps
            noise = (z - (1 - sigma) * x) / sigma  # from z = (1 - sigma) x + sigma noise
            self.implied.append(noise)
            return noise - x
        # every DDPM sampler hands the model z_t = sqrt(a) x + sqrt(1 - a) eps (Euler's scale_model_input
        # turns its x + sigma eps back into that)
        ac = self.scheduler.alphas_cumprod.double()
        sigmas = ((1 - ac) / ac).sqrt().numpy()  # Euler's timesteps may fall between two: interpolated
        sigma = float(np.interp(float(t), np.arange(len(sigmas)), sigmas))
        a = torch.tensor(1 / (1 + sigma**2), dtype=z.dtype)
        eps = (z - a.sqrt() * x) / (1 - a).sqrt()
        self.implied.append(eps)
        return eps if self.kind == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x

    def capture(self, weights, size, rows=None, readout=None):
        import contextlib

        self.acc = AttentionAccumulator(weights, size, rows)
        return contextlib.nullcontext(self.acc)

    def bend(self) -> float:
        """How far the implied noise moved over the path (0 on the ODE's exact path)."""
        return max(float((e - self.implied[0]).abs().max()) for e in self.implied)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "flow"])
def test_synthesis_and_inpainting_follow_the_models_prediction_type(kind):
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    from factory.method.families import Conditioning
    from factory.method.schedulers import make_scheduler

    if kind == "flow":
        base = FlowMatchEulerDiscreteScheduler(shift=3.0)
    else:
        base = DDIMScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            prediction_type=kind,
        )
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = Conditioning(torch.zeros(1, 3, 8))
    wrong = {"epsilon": "v_prediction", "v_prediction": "epsilon"}.get(kind)
    for name in ("ddim", "euler") if kind == "flow" else ("ddim", "dpm++", "unipc", "euler"):
        sched = make_scheduler(name, base)
        gens = [torch.Generator().manual_seed(0)]
        oracle = OracleDenoiser(x, sched, kind)
        z, _ = synthesize_latents(oracle, sched, (4, 8, 8), cond, torch.zeros(1, 3), gens, 20, capture=False)
        assert oracle.bend() < 1e-3, f"{kind} / {name}: {oracle.bend()}"
        assert float((z - x).abs().mean()) < 0.05, f"{kind} / {name}"  # SD's last alpha is not quite 1
        if wrong:  # the control: the other reading bends the path
            other = OracleDenoiser(x, sched, wrong)
            synthesize_latents(other, sched, (4, 8, 8), cond, torch.zeros(1, 3), gens, 20, capture=False)
            assert other.bend() > 0.1, f"{kind} / {name} read as {wrong}: {other.bend()}"
        region = torch.zeros(1, 1, 8, 8)
        region[..., 2:6, 2:6] = 1
        z_bg = inpaint_background(OracleDenoiser(x, sched, kind), sched, x, region, cond, gens, 20)
        assert float((z_bg - x).abs().mean()) < 0.05, f"{kind} / {name} inpainting"
    # the probe noises along the model's own forward process: for a flow, its straight path
    probe = make_scheduler("ddim", base)
    probe.set_timesteps(10)
    recorder = OracleDenoiser(x, probe, kind)
    noise_gen = torch.Generator().manual_seed(5)
    ts = probe.timesteps[-3:]
    mean_attention_map(recorder, probe, x, cond, torch.zeros(1, 3), ts, [noise_gen])
    replay = torch.Generator().manual_seed(5)
    for implied, _ in zip(recorder.implied, ts, strict=True):
        drawn = torch.randn((4, 8, 8), generator=replay)[None]
        torch.testing.assert_close(implied, drawn, rtol=0, atol=1e-4)


def test_flow_models_refuse_samplers_they_do_not_have():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from factory.method.schedulers import make_scheduler

    with pytest.raises(ValueError, match="rectified-flow.*ddim, euler"):
        make_scheduler("dpm++", FlowMatchEulerDiscreteScheduler())


# --- the VAE's dtype per family, and a VAE given in place of the model's -----------------------------------
@pytest.mark.parametrize("kind", ["sd2", "sdxl", "sd3"])
def test_an_fp16_vae_runs_in_the_dtype_of_its_familys_pipeline_and_the_pipeline_is_left_as_it_is(kind):
    """diffusers' SDXL pipelines upcast an fp16 VAE that says force_upcast, its SD and SD3 pipelines do not
    (issue 30: every fp16 SD 1.x/2.x model decoded in fp32, and the shared pipeline's VAE was changed in
    place, so plain generation after the Distiller failed with fp16 latents into an fp32 VAE)."""
    pipe = BUILDERS[kind]()
    pipe.to(torch.float16)
    pipe.vae.register_to_config(force_upcast=True)  # AutoencoderKL's default, SD 1.x/2.x's config too
    d = Distiller(kind, pipeline=pipe, config=FAST)
    assert pipe.vae.dtype == torch.float16  # the shared pipeline is untouched
    assert d.vae.dtype == (torch.float32 if kind == "sdxl" else torch.float16)
    assert (d.vae is pipe.vae) == (kind != "sdxl")


def test_plain_generation_with_the_pipeline_still_runs_after_an_fp16_distiller(toyworld_pipe):
    """`factory bench`'s baseline runs the shared pipeline after the Distiller was built on it."""
    import copy

    pipe = copy.deepcopy(toyworld_pipe).to(torch.float16)
    assert pipe.vae.config.force_upcast  # toyworld's VAE says so, as SD 1.5's does
    d = Distiller("toyworld", pipeline=pipe, config=DistillConfig(2, 1, inpaint_steps=2))
    [t] = d.synthesize([SampleSpec(Concept("star"), 0)])
    assert t.meta["dtype"] == "float16" and d.vae.dtype == torch.float16
    images = pipe("a photo of a star", num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


def test_a_named_vae_replaces_the_models_own_for_the_method_only(tmp_path):
    from tiny_models import sdxl_pipeline, vae

    fixed = vae(force_upcast=False)
    fixed.save_pretrained(tmp_path / "fp16-fixed-vae")
    pipe = sdxl_pipeline()
    d = Distiller("sdxl", pipeline=pipe, config=FAST, vae=str(tmp_path / "fp16-fixed-vae"))
    assert d.vae.config.force_upcast is False and pipe.vae.config.force_upcast is True
    (t,) = d.synthesize([SampleSpec(Concept("star"), 0)])
    assert t.meta["vae"] == "fp16-fixed-vae"


# --- unsupported families ----------------------------------------------------------------------------------
def test_an_unsupported_family_is_refused_by_name(tmp_path):
    from factory.method.loading import load_pipeline, read_model_configs

    qwen = {  # Qwen-Image: a Qwen2.5-VL text encoder and an MMDiT of its own (not served yet)
        "_class_name": "QwenImagePipeline",
        "transformer": ["diffusers", "QwenImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLQwenImage"],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
    }
    with pytest.raises(
        UnsupportedFamilyError, match="QwenImagePipeline with a QwenImageTransformer2DModel"
    ) as err:
        family_name_of_index(qwen)
    for name in ("SDXL", "Stable Diffusion 3", "1.x/2.x", "FLUX.1", "Z-Image", "FLUX.2"):
        assert name in str(err.value)
    (tmp_path / "qwen").mkdir()
    (tmp_path / "qwen" / "model_index.json").write_text(json.dumps(qwen))
    for call in (
        lambda: read_model_configs(str(tmp_path / "qwen")),
        lambda: load_pipeline(str(tmp_path / "qwen")),
    ):
        with pytest.raises(UnsupportedFamilyError, match="serves Stable Diffusion 1.x/2.x"):
            call()
    assert FAMILIES.names() == ("sd", "sdxl", "sd3", "flux", "z_image", "flux2")
    # the preflight refuses it before Ray starts, as a one-line user error
    from factory.dataset.config import load_config
    from factory.dataset.preflight import check_model
    from factory.errors import UserError

    cfg = load_config("configs/toyworld.yaml", [f"model={tmp_path / 'qwen'}", f"output.uri={tmp_path / 'o'}"])
    with pytest.raises(UserError, match="QwenImagePipeline.*the factory serves"):
        check_model(cfg)


def test_an_sdxl_nine_channel_inpainting_unet_labels_with_its_added_conditioning():
    """SDXL's inpainting UNet (random weights) takes [z, region, masked latents] with the pooled text and
    size ids; it labels images, and refuses to synthesize."""
    from diffusers import UNet2DConditionModel
    from tiny_models import sdxl_pipeline

    pipe = sdxl_pipeline()
    pipe.unet = UNet2DConditionModel.from_config({**pipe.unet.config, "in_channels": 9}).eval()
    d = Distiller("sdxl-inpainting", pipeline=pipe, config=FAST)
    photo = np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    (t,) = d.label([photo], Concept("star"), seeds=[0])
    assert t.mask.shape == (32, 32) and t.meta["family"] == "sdxl"
    with pytest.raises(ValueError, match="9-channel"):
        d.synthesize([SampleSpec(Concept("star"), 0)])


# --- a factory generate job per family -----------------------------------------------------------------
# The default lane runs a job of one UNet family beside SD's (every toyworld job), one double-stream and one
# single-stream DiT; the others' jobs (~9 s each) run in the slow lane since 2026-12-04 (their Distillers
# are tested here in the default lane: the job layer does not depend on the family).
JOB_IN_DEFAULT_LANE = ("sdxl", "flux", "z_image")


@pytest.mark.integration
@pytest.mark.parametrize(
    "build", [b if b in JOB_IN_DEFAULT_LANE else pytest.param(b, marks=pytest.mark.slow) for b in BUILDERS]
)
def test_a_generate_job_per_family(tmp_path, local_ray, short_job, build):
    from factory.dataset.config import load_config
    from factory.dataset.pipeline import run_job
    from factory.dataset.shards import ShardStore

    model = tmp_path / f"tiny-{build}"
    BUILDERS[build]().save_pretrained(model)
    cfg = load_config(
        "configs/toyworld.yaml",
        [
            f"model={model}",
            f"output.uri={tmp_path / ('out-' + build)}",
            "concepts=[{name: star, samples: 2}]",
            "sampler.resolution=32",  # the tiny models' VAEs say 32 too
            "output.samples_per_shard=2",
            # random weights draw noise, whose refined mask the edge snap may find edgeless (the tiny
            # FLUX's did): this test counts every sample
            *short_job,
        ],
    )
    summary = run_job(cfg, "generate", progress=False)
    assert summary["complete"] and summary["shards_this_run"] == 1, build
    out = tmp_path / ("out-" + build)
    samples = ShardStore(str(out)).read_shard("shard-000000.tar")
    metas = [json.loads(s["json"]) for s in samples]
    assert json.loads((out / "manifest.json").read_text())["totals"]["written"] == len(samples) == 2
    assert {"png", "mask.png", "prelim.png", "attn.npy", "fg.png", "bg.png"} <= set(samples[0])
    assert all(m["family"] == FAMILY_OF[build] and m["model"] == f"tiny-{build}" for m in metas)


# --- the shipped random-weight architectures ---------------------------------------------------------------
@pytest.mark.parametrize(
    "arch, family, denoiser_params, resolution",
    [
        ("sd15-arch", "sd", 859_520_964, 512),  # the published parameter counts of the real models
        ("sdxl-arch", "sdxl", 2_567_463_684, 1024),
        ("sd3-arch", "sd3", 2_028_328_000, 1024),  # SD3 Medium's MMDiT
        ("flux-arch", "flux", 11_901_408_320, 1024),  # FLUX.1-dev's transformer
    ],
)
def test_the_shipped_architectures_are_the_real_ones(arch, family, denoiser_params, resolution):
    from factory.method.loading import (
        ARCHITECTURES,
        ModelLoadError,
        build_random_pipeline,
        model_geometry,
        read_model_configs,
    )

    assert read_model_configs(arch)["family"] == family and model_geometry(arch) == (resolution, 8)
    pipe = build_random_pipeline(str(ARCHITECTURES[arch]), device="meta")  # shapes only, no memory
    fam = detect_family(pipe)
    assert fam.name == family and fam.native_resolution() == resolution
    assert sum(p.numel() for p in fam.denoiser_module.parameters()) == denoiser_params
    if family == "sdxl":
        assert sum(p.numel() for p in pipe.text_encoder_2.parameters()) == 694_659_840  # OpenCLIP bigG
    if family == "flux":
        assert sum(p.numel() for p in pipe.text_encoder_2.parameters()) == 4_762_310_656  # T5-v1.1-XXL
        small = build_random_pipeline(
            str(ARCHITECTURES[arch]),
            device="meta",
            overrides={"transformer": {"num_layers": 2}, "text_encoder_2": {"num_layers": 1}},
        )  # the CPU bench's depth-reduced variant: FLUX.1-dev's width
        assert len(small.transformer.transformer_blocks) == 2 and small.text_encoder_2.config.num_layers == 1
        assert (
            small.transformer.config.attention_head_dim * small.transformer.config.num_attention_heads == 3072
        )
        with pytest.raises(ModelLoadError, match="no key num_blocks"):
            build_random_pipeline(
                str(ARCHITECTURES[arch]), device="meta", overrides={"vae": {"num_blocks": 1}}
            )
    assert fam.token_weights(["a photo of a star"], [["star"]]).sum() >= 1


def test_a_family_is_one_registered_class(monkeypatch):
    from factory.method import families
    from factory.method.loading import ModelLoadError, _check_components
    from factory.registry import Registry

    registry = Registry("model family")  # the shipped families, and one more, for this test only
    for name, cls in FAMILIES.items():
        registry.register(name, cls)
    monkeypatch.setattr(families, "FAMILIES", registry)

    @families.register_family
    class PixArtLike(families.SD3Family):
        name = "pixart-like"
        description = "a PixArt-like DiT"
        denoiser_class = "PixArtTransformer2DModel"
        required_components = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")

    index = {"_class_name": "PixArtAlphaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"]}
    index.update({c: ["x", "Y"] for c in ("vae", "text_encoder", "tokenizer", "scheduler")})
    assert family_name_of_index(index) == "pixart-like"
    assert "a PixArt-like DiT ('pixart-like')" in families.supported()
    with pytest.raises(ModelLoadError, match="without vae, tokenizer, scheduler; .*pixart-like model needs"):
        _check_components("m", "PixArtAlphaPipeline", PixArtLike, {"transformer", "text_encoder"})
    with pytest.raises(UnsupportedFamilyError, match="'dpm\\+\\+' is not served for a pixart-like model"):
        PixArtLike.check_sampler("dpm++")


def test_the_preflight_refuses_a_sampler_the_family_does_not_serve(tmp_path):
    from factory.dataset.config import load_config
    from factory.dataset.preflight import check_model

    over = ["model=sd3-arch", f"output.uri={tmp_path}", "sampler.probe_t0=4", "sampler.steps=4"]
    check_model(load_config("configs/toyworld.yaml", over))  # ddim: the flow's Euler sampler
    with pytest.raises(UnsupportedFamilyError, match="'unipc' is not served for a sd3 model"):
        check_model(load_config("configs/toyworld.yaml", [*over, "inpaint.scheduler=unipc"]))


def test_the_preflight_finds_the_concept_as_the_loaded_family_does(tmp_path):
    """The preflight checks prompts with the family over the model's tokenizers alone: the same positions
    as the loaded pipeline's family, for every family; a concept that the chat template (FLUX.2-dev's system
    turn, Z-Image's user turn) pushes past the 512 text tokens that reach the model is refused before Ray
    starts (the raw tokenizers, as checked before, have no such window)."""
    from factory.dataset.config import load_config
    from factory.dataset.preflight import PromptError, check_prompts
    from factory.method.families import FAMILIES
    from factory.method.loading import load_tokenizers

    prompts, words = ["a photo of a star", "a red fire truck on grass"], [["star"], ["fire", "truck"]]
    for build, make in BUILDERS.items():
        pipe = make()
        pipe.save_pretrained(tmp_path / build)
        text = FAMILIES[FAMILY_OF[build]].over_tokenizers(load_tokenizers(str(tmp_path / build)))
        assert torch.equal(
            text.token_weights(prompts, words), detect_family(pipe).token_weights(prompts, words)
        )
        if build in ("flux2_dev", "z_image"):
            late = "a photo of " + "a " * 530 + "star"  # past 512 in the templated prompt
            over = [f"model={tmp_path / build}", f"output.uri={tmp_path / 'out'}"]
            cfg = load_config(
                "configs/toyworld.yaml", [*over, f"concepts=[{{name: star, template: '{late}'}}]"]
            )
            with pytest.raises(PromptError, match="beyond the model's 512 text positions"):
                check_prompts(cfg)
            ok = "a photo of " + "a " * 300 + "star"
            check_prompts(
                load_config("configs/toyworld.yaml", [*over, f"concepts=[{{name: star, template: '{ok}'}}]"])
            )


def test_an_inpainting_model_must_fit_the_models_denoiser():
    """`inpaint.model` (m'): the same denoiser class, reading text features as wide as the model's (the
    preflight reads both from their configs; the Distiller checks the loaded one)."""
    from factory.method.loading import ModelLoadError, check_inpaint_fits

    unet = {"_class_name": "UNet2DConditionModel", "cross_attention_dim": 768}
    flux = {"_class_name": "FluxTransformer2DModel", "joint_attention_dim": 4096}
    check_inpaint_fits("m", "m-prime", unet, dict(unet))
    check_inpaint_fits("m", "m-prime", flux, {"joint_attention_dim": 4096})  # a loaded module's config
    with pytest.raises(ModelLoadError, match="reads text features of width 1024, the model's .* 768"):
        check_inpaint_fits("m", "m-prime", unet, {**unet, "cross_attention_dim": 1024})
    with pytest.raises(ModelLoadError, match="FluxTransformer2DModel"):
        check_inpaint_fits("m", "m-prime", unet, flux)
