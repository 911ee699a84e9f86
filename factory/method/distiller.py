"""The Python API of the method: label existing images, or synthesize and label new ones.

    from factory import Distiller, Concept
    d = Distiller("toyworld")                                   # or a local SD dir / hub id, device="cuda"
    triplets = d.synthesize([SampleSpec(Concept("star"), seed=s) for s in range(8)])
    labelled = d.label([image], Concept("star"), seeds=[0])

One sample's path (both modes), top to bottom:
  1. image -> one canvas geometry (`factory.method.geometry`) -> VAE latents           [label: `probe`]
     or text-to-image (DDIM or `factory.method.schedulers`) with in-loop attention capture
     (`factory.method.synthesis`)                                                  [synthesis: `generate`]
  2. mean cross-attention map of the concept tokens (`factory.method.probe`, paper Step 1)
     -> `ConceptMaps`, which `draft(maps)` takes for steps 3-4
  3. preliminary mask: GMM midpoint + 3x3 majority on the valid region (`factory.method.masks`, Step 2)
  4. background inpainting of the preliminary region (`factory.method.inpaint`, Step 4)
     -> a `Draft` (`factory.method.triplet`): all model calls are done; `finish=False` returns it here
  5. refined mask: rule(|x - background|) AND M_pre (`factory.method.refine`, Step 4b), edges snapped to the
     image's with a guided filter (`factory.method.edges`; ours, `edges="none"` is the paper's)
  6. a `Triplet`: image, refined mask, preliminary mask, attention, RGBA foreground, background, metadata
     (steps 5-6 are `Draft.finish()`, CPU work: a Ray job runs them in its writer tasks)

All randomness comes from one torch.Generator per sample seeded by the sample's seed, so a sample depends
only on (config, seed), not on the batch it is in.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from factory.method.families import Conditioning, detect_family
from factory.method.geometry import Canvas, to_canvas
from factory.method.inpaint import inpaint_background
from factory.method.latents import decode_latents, encode_images
from factory.method.loading import load_pipeline, model_id
from factory.method.masks import MaskStats, binarize
from factory.method.probe import mean_attention_map, probe_timesteps, repaint_everything
from factory.method.readouts import Readout
from factory.method.schedulers import make_scheduler
from factory.method.settings import Concept, DistillConfig, SampleSpec
from factory.method.synthesis import synthesize_latents
from factory.method.triplet import Draft, RefineSettings, Triplet

GPU_MICRO_BATCH = 8  # micro_batch=None on a GPU: samples per model call (a Ray job's resources.batch_size)


@dataclass
class ConceptMaps:
    """A micro-batch after Steps 1-2 (`Distiller.probe` in label mode, `Distiller.generate` in synthesis
    mode): what `Distiller.draft` takes for Steps 3-4."""

    mode: str  # "label" | "synthesis"
    specs: list[SampleSpec]
    generators: list[
        torch.Generator
    ]  # one per sample, seeded by its seed; the inpainting draws from them too
    latents: torch.Tensor  # (B, C, h, w) z0 on the model's device
    attention: torch.Tensor | None  # (B, h, w) mean attention of each sample's concept tokens
    canvases: list[Canvas]  # each image's geometry on the model's square canvas
    images: list[np.ndarray]  # (S, S, 3) uint8 canvases
    originals: list[np.ndarray] | None  # label mode: the images in their own size
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, for the whole micro-batch


def draft_each(maps: ConceptMaps, distillers: list[Distiller]) -> list[list[Draft]]:
    """One probe drafted by several distillers (other inpainting models or settings of Steps 3-4), each
    from the same noise: the samples' generators are set back before each, so each distiller's drafts are
    what its own `label` of the images would give."""
    states = [g.get_state() for g in maps.generators]
    out = []
    for d in distillers:
        for g, state in zip(maps.generators, states, strict=True):
            g.set_state(state)
        out.append(d.draft(maps))
    return out


class Distiller:
    """Concept distillation with one loaded pipeline: label images, or synthesize and label new ones.

    Args:
        model: a short name (`"toyworld"`), a local diffusers pipeline directory or a hub id, of any family in
            `factory.method.families` (SD 1.x/2.x, SDXL, SD3); the family is detected from the pipeline.
        device: `"cpu"`, `"cuda"`, `"cuda:1"`, ...
        dtype: `"fp32"`, `"fp16"`, `"bf16"` or None (fp16 on CUDA, fp32 on the CPU).
        config: the method's settings; default `DistillConfig()`, the paper's.
        pipeline: an already loaded diffusers pipeline to use instead of loading `model`.
        inpaint_model: the fine-tuned m' (`trainers finetune`) for Step 4's background inpainting, while
            `model` (the pretrained m) gives the attention of Steps 1-2, as the paper does for real images. It
            must share m's VAE and text encoder (fine-tuning freezes both). UNet families only.
        vae: a VAE (a diffusers `AutoencoderKL` directory or hub id) to use instead of the model's, e.g. the
            fp16-fixed SDXL VAE. A VAE that says `force_upcast` (SDXL's own) runs in fp32 when the model
            runs in fp16, where it would overflow, as in diffusers' SDXL pipelines; SD 1.x/2.x VAEs run in the
            model's dtype, as in diffusers' SD pipeline. The loaded pipeline itself is left as it is.

    Raises:
        ModelLoadError: the model or the inpainting model cannot be loaded; the message says what to do.

    Not thread-safe: make one per worker or actor.

    Example:
        >>> fast = DistillConfig(num_inference_steps=8, probe_t0=6, inpaint_steps=8)
        >>> d = Distiller("toyworld", config=fast)
        >>> [t] = d.synthesize([SampleSpec(Concept("star"), seed=0)])
        >>> t.image.shape, t.mask.dtype
        ((64, 64, 3), dtype('bool'))
    """

    def __init__(
        self,
        model: str = "toyworld",
        device: str = "cpu",
        dtype: str | None = None,
        config: DistillConfig | None = None,
        pipeline=None,
        inpaint_model: str | None = None,
        vae: str | None = None,
    ):
        from factory.method.edges import check_edges_available
        from factory.method.loading import ModelLoadError, load_inpaint_denoiser, load_vae

        self.config = config or DistillConfig()
        check_edges_available(self.config.edges)  # before the model loads, not at the first refined mask
        self.model = model
        self.pipe = pipeline if pipeline is not None else load_pipeline(model, device, dtype)
        p = self.pipe
        self.family = detect_family(p)
        self.vae_model = vae
        # The VAE of Steps 1, 4 and 6, in the dtype the family's diffusers pipeline uses (fp32 for SDXL's
        # in fp16, the model's own for SD 1.x/2.x and SD3): `family.method_vae`. The pipeline stays as it is.
        self.vae = self.family.method_vae(load_vae(vae, self.device, self.dtype) if vae is not None else None)
        self.inpaint_model = inpaint_model
        self.inpaint_unet = self.family.denoiser_module
        if inpaint_model is not None:
            if not self.family.finetuned_inpainting:
                raise ModelLoadError(
                    f"inpaint.model (a fine-tuned m') is not served for a {self.family.name} model, which "
                    "inpaints with its own denoiser"
                )
            self.inpaint_unet = load_inpaint_denoiser(model, inpaint_model, self.family)
        # Three samplers on the model's own noise schedule: the probe's DDIM grid (paper Step 1), synthesis's
        # and Step 4's, each its own object since multistep schedulers keep state between steps.
        # (a rectified-flow model's are all its flow-matching Euler scheduler: factory.method.schedulers)
        self.family.check_readout(self.config.readout)
        if self.config.compile and self.config.readout != "image_to_text":
            raise ValueError(
                "compile: true serves the image_to_text readout only: concept_output installs its word "
                "streams per batch, which would recompile the model each time; run it without compile"
            )
        if self.config.readout == "concept_output":  # its words are checked before any model work
            self.family.concept_streams([[]], self.config.background_words)
        self.vae_factor = self.family.vae_factor
        self.resolution = self.config.resolution or self.family.native_resolution()
        if self.resolution % self.family.resolution_multiple:
            raise ValueError(
                f"resolution {self.resolution} is not a multiple of {self.family.resolution_multiple} (the "
                f"VAE factor {self.vae_factor} times the {self.family.name} denoiser's patch size)"
            )
        self.latent_size = self.resolution // self.vae_factor
        # (FLUX.2's shift depends on the step count too: the inpainting's schedule is for its own steps)
        schedule = self.family.schedule_config(p.scheduler, self.resolution, self.config.num_inference_steps)
        inpaint_schedule = self.family.schedule_config(
            p.scheduler, self.resolution, self.config.inpaint_steps
        )
        self.probe_scheduler = make_scheduler("ddim", schedule)
        self.sampler = make_scheduler(self.config.scheduler, schedule)
        self.inpaint_sampler = make_scheduler(self.config.inpaint_scheduler, inpaint_schedule)
        denoiser = self.family.denoiser_module
        if self.config.channels_last:
            for module in {id(m): m for m in (denoiser, self.inpaint_unet, self.vae)}.values():
                module.to(memory_format=torch.channels_last)
        if self.config.compile:
            from factory.method.attention import install_capture

            install_capture(denoiser, self.config.readout_layers)
            shared = self.inpaint_unet is denoiser
            # the pipeline's own denoiser is replaced: plain generation with it is compiled too
            self.family.denoiser_module = torch.compile(denoiser)
            self.inpaint_unet = self.family.denoiser_module if shared else torch.compile(self.inpaint_unet)
        self.denoiser = self.family.denoiser()
        self.inpaint_denoiser = self.family.denoiser(self.inpaint_unet)

    # ------------------------------------------------------------------ shared pieces
    @property
    def device(self):
        return self.family.denoiser_module.device

    @property
    def dtype(self):
        return self.family.denoiser_module.dtype

    @property
    def edge_radius_px(self) -> int:
        """The guided filter's radius in pixels: `edge_radius` latent cells."""
        return max(1, round(self.config.edge_radius * self.vae_factor))

    def embed(self, prompts: list[str]) -> Conditioning:
        """The prompts' text conditioning, in the model's dtype, as the family's pipeline encodes them."""
        return self.family.encode(prompts).to(self.dtype)

    def embed_negative(self, prompts: list[str]) -> Conditioning:
        """The conditioning of a guidance's negative branch (SDXL: zeros for an empty prompt)."""
        return self.family.encode_negative(prompts).to(self.dtype)

    def token_weights(self, specs: list[SampleSpec]) -> torch.Tensor:
        """(B, text tokens) weights of each spec's concept words; raises ConceptTokenError before any work."""
        return self.family.token_weights(
            [s.concept.prompt for s in specs], [s.concept.token_words for s in specs]
        )

    def readout(self, specs: list[SampleSpec]) -> Readout:
        """The concept map's readout for one micro-batch: the configured one, with the batch's word streams
        for `concept_output`."""
        if self.config.readout != "concept_output":
            return self.config.readout_spec()
        words = [s.concept.token_words for s in specs]
        return self.config.readout_spec(self.family.concept_streams(words, self.config.background_words))

    def _clock(self) -> float:
        """perf_counter after the device's queued work: stage timings that are true on a GPU too (one sync
        per stage, never inside a denoising loop)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _prelim(self, attention: np.ndarray, canvases: list[Canvas]):
        """M_pre per sample, its rule's stats, and whether its map was finite. A map with a NaN or inf (an
        fp16 overflow, say) gets an empty M_pre and is rejected as `nonfinite_attention` by the job's filter:
        one bad sample must not fail the actor call, which Ray would retry until the job fails.

        `attention` is the maps as the shards store them (float16, `.attn.npy`), so a stored map gives
        back its M_pre bit for bit (`with_maps`, `factory refine`): a float32 map whose GMM split fell
        between two float16 neighbours gave another M_pre on another CPU."""
        masks, stats, finite = [], [], []
        for a, c in zip(attention.astype(np.float32), canvases, strict=True):
            vh, vw = c.latent_valid(self.vae_factor)
            m = np.zeros(a.shape, bool)
            ok = bool(np.isfinite(a[:vh, :vw]).all())
            if ok:
                m[:vh, :vw], st = binarize(a[:vh, :vw], self.config.mask_rule)
            else:
                st = MaskStats(self.config.mask_rule, 0.0, (), (), 0.0)
            masks.append(m)
            stats.append(st)
            finite.append(ok)
        return masks, stats, finite

    def draft(self, maps: ConceptMaps) -> list[Draft]:
        """Steps 3-4 of a micro-batch, shared by both modes: M_pre from each concept map, the background
        inpainted into M_pre's region and decoded. Returns each sample's `Draft` (all model calls done);
        `Draft.finish()` gives its triplet. `maps` is not changed, so one probe can be drafted several ways
        (`trainers scheduler-sweep`)."""
        cfg, n = self.config, len(maps.specs)
        timings = dict(maps.timings)
        # 3. Preliminary masks M_pre from the attention maps (paper Step 2), on each canvas's valid region.
        t = self._clock()
        attention = maps.attention.float().cpu().numpy().astype(np.float16)  # as `.attn.npy` stores it
        prelims, prelim_stats, finite = self._prelim(attention, maps.canvases)
        timings["prelim_s"] = self._clock() - t

        # 4. Background: inpaint the M_pre region with the background prompt (Step 4), decode to pixels.
        t = self._clock()
        region = torch.from_numpy(np.stack(prelims)).to(self.device, self.dtype)[:, None]
        z_bg = inpaint_background(
            self.inpaint_denoiser,
            self.inpaint_sampler,
            z0=maps.latents,
            region=region,
            bg_emb=self.embed([cfg.background_prompt] * n),
            generators=maps.generators,
            num_inference_steps=cfg.inpaint_steps,
            fg_emb=self.embed([s.concept.prompt for s in maps.specs]) if cfg.object_guidance else None,
            object_guidance=cfg.object_guidance,
            masked_image_latents=maps.latents * (1 - region)
            if self.inpaint_denoiser.in_channels == 9
            else None,
        )
        timings["inpaint_s"] = self._clock() - t
        t = self._clock()
        backgrounds = decode_latents(self.vae, z_bg)
        timings["decode_s"] = timings.get("decode_s", 0.0) + self._clock() - t

        # The draft of each sample: what Steps 5-6 take. Only CPU work is left, which a Ray job runs in its
        # writer tasks (`finish=False`), off the GPU actor's critical path.
        t = self._clock()
        settings = RefineSettings(
            rule=cfg.mask_rule,
            close_and_fill=cfg.close_and_fill,
            edges=cfg.edges,
            edge_radius_px=self.edge_radius_px,
            edge_eps=cfg.edge_eps,
        )
        drafts = []
        for i, spec in enumerate(maps.specs):
            c = maps.canvases[i]
            vh, vw = c.latent_valid(self.vae_factor)
            meta = self._metadata(spec, maps.mode, c, timings)
            meta.update(
                prelim_stats=prelim_stats[i].as_dict(),
                attention_finite=finite[i],  # False: filters reject it as nonfinite_attention
                prelim_area=float(prelims[i][:vh, :vw].mean()),
            )
            drafts.append(
                Draft(
                    key=spec.key,
                    image=maps.images[i],
                    background=backgrounds[i],
                    prelim=prelims[i],
                    attention=attention[i],
                    canvas=c,
                    original=maps.originals[i] if maps.originals is not None else None,
                    settings=settings,
                    meta=meta,
                )
            )
        timings["draft_s"] = self._clock() - t
        for d in drafts:
            d.meta["timings"] = {k: v / n for k, v in timings.items()}  # per-sample share
        return drafts

    def _metadata(self, spec: SampleSpec, mode: str, canvas: Canvas, timings: dict) -> dict:
        """What a sample's `.json` records of how it was made."""
        cfg = self.config
        synthesis = mode == "synthesis"
        return {
            "key": spec.key,
            "mode": mode,
            "concept": spec.concept.name,
            "prompt": spec.concept.prompt,
            "concept_words": spec.concept.token_words,
            "seed": spec.seed,
            "model": model_id(self.model),
            "family": self.family.name,
            "prediction_type": self.pipe.scheduler.config.get("prediction_type", "flow"),
            "inpaint_model": model_id(self.inpaint_model) if self.inpaint_model else None,
            "vae": model_id(self.vae_model) if self.vae_model else None,
            "steps": cfg.num_inference_steps,
            "probe_t0": cfg.probe_t0,
            "inpaint_steps": cfg.inpaint_steps,
            "dtype": str(self.dtype).removeprefix("torch."),
            "scheduler": cfg.scheduler if synthesis else None,
            "inpaint_scheduler": cfg.inpaint_scheduler,
            "guidance_scale": cfg.guidance_scale if synthesis else None,
            "object_guidance": cfg.object_guidance,
            "attention_source": cfg.attention if synthesis else "probe",
            "canvas": canvas.as_dict(),
            "timings": dict(timings),
        }

    # ------------------------------------------------------------------ public API
    def batch_size(self, n: int) -> int:
        """Samples per model call for a list of n: `config.micro_batch`, else 1 on the CPU and at most
        GPU_MICRO_BATCH on a GPU."""
        if self.config.micro_batch:
            return self.config.micro_batch
        return 1 if self.device.type == "cpu" else min(n, GPU_MICRO_BATCH)

    def label(
        self,
        images: list[np.ndarray],
        concept: Concept | list[Concept],
        seeds: list[int],
        keys: list[str] | None = None,
        finish: bool = True,
    ) -> list[Triplet] | list[Draft]:
        """Label existing (unlabelled) images: paper Steps 1, 2, 4 and 4b.

        Args:
            images: (H, W, 3) uint8 RGB arrays (grey (H, W) arrays are repeated to RGB), any size.
            concept: one concept for all images, or one per image.
            seeds: one seed per image (the probe's and the inpainting's noise).
            keys: the samples' keys; default `"{concept}-{seed:010d}"`.
            finish: False stops after the model calls and returns `Draft`s, whose `finish()` (CPU work
                only) gives the triplets: a Ray job runs it in its writer tasks.

        Returns:
            One `Triplet` (or `Draft`) per image, in order, in the image's own size.

        Example:
            >>> [t] = d.label([image], Concept("star"), seeds=[0])
        """
        concepts = concept if isinstance(concept, list) else [concept] * len(images)
        if not (len(images) == len(concepts) == len(seeds)):
            raise ValueError("images, concepts and seeds must have the same length")
        keys = keys or [f"{c.name}-{s:010d}" for c, s in zip(concepts, seeds, strict=True)]
        specs = [SampleSpec(c, s, k) for c, s, k in zip(concepts, seeds, keys, strict=True)]
        self.token_weights(specs)  # validate every prompt before any model work
        mb = self.batch_size(len(specs))
        drafts = [
            d
            for i in range(0, len(specs), mb)
            for d in self.draft(self.probe(images[i : i + mb], specs[i : i + mb]))
        ]
        return [d.finish() for d in drafts] if finish else drafts

    def _encode(self, images: list[np.ndarray], specs: list[SampleSpec]) -> ConceptMaps:
        """Step 1 of label mode: each image on one canvas geometry, encoded by the VAE (latents sampled from
        the posterior by each sample's seeded generator). The maps' `attention` is not set yet."""
        t = self._clock()
        placed = [to_canvas(np.asarray(im), self.resolution) for im in images]
        canvas_images = [im for im, _ in placed]
        generators = [torch.Generator().manual_seed(int(s.seed)) for s in specs]
        x = torch.from_numpy(np.stack(canvas_images)).permute(0, 3, 1, 2).float().div(127.5).sub(1)
        latents = encode_images(self.vae, x.to(self.device, self.vae.dtype), generators).to(self.dtype)
        originals = [
            np.asarray(im)[..., :3]
            if np.asarray(im).ndim == 3
            else np.repeat(np.asarray(im)[..., None], 3, 2)
            for im in images
        ]
        return ConceptMaps(
            mode="label",
            specs=specs,
            generators=generators,
            latents=latents,
            attention=None,
            canvases=[c for _, c in placed],
            images=canvas_images,
            originals=originals,
            timings={"encode_s": self._clock() - t},
        )

    def probe(self, images: list[np.ndarray], specs: list[SampleSpec]) -> ConceptMaps:
        """Steps 1-2 of label mode for one micro-batch: each image on the model's canvas, its latents, and
        the mean attention map of its concept (the paper's probe). `draft` takes the result."""
        cfg = self.config
        # 1. Each image on one canvas geometry, encoded by the VAE.
        maps = self._encode(images, specs)

        # 2. The concept tokens' mean cross-attention over the T0 least-noisy steps (paper Step 1).
        t = self._clock()
        maps.attention = mean_attention_map(
            self.denoiser,
            self.probe_scheduler,
            latents=maps.latents,
            text_embeddings=self.embed([s.concept.prompt for s in specs]),
            token_weights=self.token_weights(specs),
            timesteps=probe_timesteps(self.probe_scheduler, cfg.num_inference_steps, cfg.probe_t0),
            generators=maps.generators,
            repeats=cfg.probe_repeats,
            inpainting_inputs=repaint_everything(self.vae, maps.latents)
            if self.denoiser.in_channels == 9
            else None,
            readout=self.readout(specs),
        )
        maps.timings["attention_s"] = self._clock() - t
        return maps

    def with_maps(
        self, images: list[np.ndarray], attention: list[np.ndarray], specs: list[SampleSpec]
    ) -> ConceptMaps:
        """Label mode with the concept maps already known (a label or generate output's `.attn.npy`, made
        by this model at this resolution): Step 1 only, the probe skipped. `draft` then inpaints with this
        distiller's inpainting model: the paper's relabelling with m' of what m has labelled, without
        probing m again (`factory refine`). The inpainting's noise is each seed's generator after the
        encoding, not after a probe, so the backgrounds are not bit for bit those of `label`."""
        maps = self._encode(images, specs)
        grid = tuple(maps.latents.shape[-2:])
        bad = [s.key for s, a in zip(specs, attention, strict=True) if tuple(np.shape(a)) != grid]
        if bad:
            raise ValueError(
                f"the concept maps of {bad[:3]} are not on this model's latent grid {grid}: they were made "
                "by another model or at another sampler.resolution"
            )
        maps.attention = torch.from_numpy(np.stack(attention).astype(np.float32)).to(self.device)
        return maps

    def synthesize(self, specs: list[SampleSpec], finish: bool = True) -> list[Triplet] | list[Draft]:
        """Generate images of each spec's concept and label them: paper Step 5.

        Args:
            specs: what to generate; each spec's seed fixes its noise, so a sample does not depend on its
                batch.
            finish: False returns `Draft`s, as `label` does.

        Returns:
            One `Triplet` (or `Draft`) per spec, in order, at the model's resolution (or `config.resolution`).

        Example:
            >>> triplets = d.synthesize([SampleSpec(Concept("star"), seed=s) for s in range(4)])
        """
        if self.denoiser.in_channels == 9:
            raise ValueError(
                "synthesis needs a text-to-image UNet; a 9-channel inpainting UNet can only label images"
            )
        specs = [
            s if s.key else SampleSpec(s.concept, s.seed, f"{s.concept.name}-{s.seed:010d}") for s in specs
        ]
        self.token_weights(specs)  # validate every prompt before any model work
        mb = self.batch_size(len(specs))
        drafts = [d for i in range(0, len(specs), mb) for d in self.draft(self.generate(specs[i : i + mb]))]
        return [d.finish() for d in drafts] if finish else drafts

    def generate(self, specs: list[SampleSpec]) -> ConceptMaps:
        """Steps 1-2 of synthesis mode for one micro-batch: text-to-image latents with the concept's mean
        attention recorded in the same loop (or by the probe afterwards), decoded. `draft` takes the
        result."""
        cfg = self.config
        timings: dict[str, float] = {}
        generators = [torch.Generator().manual_seed(int(s.seed)) for s in specs]
        weights = self.token_weights(specs)
        readout = self.readout(specs)
        # 1. Text-to-image sampling; the T0 least-noisy steps record the concept's attention (in-loop).
        t = self._clock()
        cond = self.embed([s.concept.prompt for s in specs])
        guided = cfg.guidance_scale != 1.0
        latents, attention = synthesize_latents(
            self.denoiser,
            self.sampler,
            shape=(self.denoiser.in_channels, self.latent_size, self.latent_size),
            cond_emb=cond,
            token_weights=weights,
            generators=generators,
            num_inference_steps=cfg.num_inference_steps,
            guidance_scale=cfg.guidance_scale,
            negative_emb=self.embed_negative([cfg.negative_prompt] * len(specs)) if guided else None,
            capture_t0=cfg.probe_t0,
            capture=cfg.attention == "loop",
            readout=readout,
        )
        timings["generate_s"] = self._clock() - t
        # 2. Or the paper's probe on the generated latents (`sampler.attention: probe`).
        if cfg.attention == "probe":
            t = self._clock()
            attention = mean_attention_map(
                self.denoiser,
                self.probe_scheduler,
                latents=latents,
                text_embeddings=cond,
                token_weights=weights,
                timesteps=probe_timesteps(self.probe_scheduler, cfg.num_inference_steps, cfg.probe_t0),
                generators=generators,
                repeats=cfg.probe_repeats,
                readout=readout,
            )
            timings["attention_s"] = self._clock() - t
        t = self._clock()
        images = decode_latents(self.vae, latents)
        timings["decode_s"] = self._clock() - t
        side = self.resolution
        return ConceptMaps(
            mode="synthesis",
            specs=specs,
            generators=generators,
            latents=latents,
            attention=attention,
            canvases=[Canvas(side, side, side, side, side)] * len(specs),
            images=list(images),
            originals=None,
            timings=timings,
        )

    def config_dict(self) -> dict:
        return asdict(self.config)
