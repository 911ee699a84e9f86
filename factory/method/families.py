"""Model families: what differs between SD 1.x/2.x, SDXL, SD3, FLUX.1, Z-Image and FLUX.2 pipelines, and only
that, in one place.

    family = detect_family(pipe)              # SDFamily, ..., FluxFamily, ZImageFamily, Flux2Family
    cond = family.encode(["a photo of a bird"])            # a Conditioning: text tokens (+ pooled)
    weights = family.token_weights(prompts, [["bird"]])    # 1 at the concept's tokens of the text stream
    denoiser = family.denoiser()                           # eps / v / flow prediction for (z, t, cond)
    with denoiser.capture(weights, size) as acc: denoiser(z, t, cond)

A family is one class here, registered in `FAMILIES`: how it is recognised from a pipeline's components (its
`model_index.json`, or a loaded pipeline), the components it needs, its samplers, how it encodes prompts and
finds the concept's tokens, its denoiser call and its attention capture. Adding one is one class and its
tests (docs/development.md).

The families, how each is detected, called, conditioned and read:

- `sd`: a `UNet2DConditionModel` and one text encoder (SD 1.x, 2.x, toyworld). `unet(z, t, text)`; the text
  is CLIP's last hidden state; the concept map comes from every `attn2` (cross-attention); DDPM noise with
  epsilon or v-prediction (SD 2.x 768).
- `sdxl`: the same UNet class with `text_encoder_2`. `unet(z, t, text, added_cond_kwargs=pooled + time
  ids)`; the text is both CLIPs' penultimate hidden states, concatenated per token; every `attn2`; DDPM,
  epsilon or v.
- `sd3`: an `SD3Transformer2DModel` (MMDiT). `transformer(z, text, pooled, t)`; the text is CLIP-L and
  CLIP-G per token, then T5's tokens where the pipeline has T5; the concept map comes from the image-to-text
  block of every joint attention; rectified flow.
- `flux`: a `FluxTransformer2DModel` (FLUX.1): double- and single-stream blocks over 2 x 2-packed latents;
  the text is T5's tokens (CLIP gives the pooled vector); the concept map comes from the image-to-text
  attention of every block; rectified flow with a resolution-dependent shift.
- `z_image`: a `ZImageTransformer2DModel` (Z-Image, Z-Image-Turbo): single-stream layers over [image;
  caption]; the caption is Qwen3's hidden states of the chat-templated prompt; the concept map comes from
  the image-to-caption attention of the main layers; rectified flow.
- `flux2`: a `Flux2Transformer2DModel` (FLUX.2 dev, klein): FLUX.1's block layout over 2 x 2-packed,
  batch-normalized VAE latents; the text is three stacked hidden layers of Mistral-3 (dev) or Qwen3 (klein)
  over the chat-templated prompt; the concept map comes from the image-to-text attention of every block;
  rectified flow with a shift fitted to the token and step counts.

The prediction type (epsilon, v) is the scheduler config's, so every sampler step, the probe's noising and
the blending of the inpainting follow it without code of their own here. Text embeddings are computed by
the pipeline's own `encode_prompt` (SDXL, SD3), or as `StableDiffusionPipeline` does (`sd`,
`factory.method.prompts.encode_prompts`). The family's name goes into every sample's metadata.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from factory.errors import UserError
from factory.method.attention import capture_concept_attention, denoiser_layout
from factory.method.prompts import (
    ConceptTokenError,
    chat_templated,
    encode_prompts,
    token_weight_matrix,
)
from factory.method.readouts import READOUTS, Readout
from factory.method.schedulers import FLOW_SCHEDULERS, SCHEDULERS
from factory.registry import Registry, first_match

FAMILIES: Registry = Registry("model family")  # name -> family class, in the order they are tried


def register_family(cls):
    """Class decorator: `cls` (a family) under its `name`."""
    return FAMILIES.register(cls.name, cls)


def supported() -> str:
    """The served families, for error messages."""
    return ", ".join(f"{cls.description} ('{name}')" for name, cls in FAMILIES.items())


class UnsupportedFamilyError(UserError, ValueError):
    """A pipeline of a family the factory does not serve; the message names the ones it does."""


def component_classes(index: dict) -> dict[str, str]:
    """{component: class name} of a `model_index.json` (components saved as None left out)."""
    return {
        name: entry[1]
        for name, entry in index.items()
        if not name.startswith("_") and isinstance(entry, (list, tuple)) and None not in entry
    }


def family_name_of_index(index: dict, model: str = "the model") -> str:
    """The family of a pipeline from its `model_index.json` alone (no weights): what the preflight reads."""
    classes = component_classes(index)
    name = first_match(FAMILIES, lambda family: family.matches(classes))
    if name is None:
        pipeline = index.get("_class_name", "pipeline")
        denoiser = classes.get("transformer") or classes.get("unet") or classes.get("prior") or "no denoiser"
        raise UnsupportedFamilyError(
            f"{model} is a {pipeline} with a {denoiser}; the factory serves {supported()}. A Qwen-Image, "
            "Chroma, PixArt or Kandinsky pipeline is not served yet: its concept maps need a capture of "
            "their own."
        )
    return name


@dataclass
class Conditioning:
    """What the denoiser is conditioned on: the text tokens (B, T, D), for SDXL, SD3 and FLUX the pooled text
    embedding (B, P), and for Z-Image, whose captions keep only their own tokens, the mask (B, T) of the
    tokens each caption has (the rest is zero padding)."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def to(self, dtype: torch.dtype) -> Conditioning:
        pooled = self.pooled.to(dtype) if self.pooled is not None else None
        return Conditioning(self.hidden.to(dtype), pooled, self.mask)

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        pooled, masks = [p.pooled for p in parts], [p.mask for p in parts]
        return Conditioning(
            torch.cat([p.hidden for p in parts]),
            torch.cat(pooled) if pooled[0] is not None else None,
            torch.cat(masks) if masks[0] is not None else None,
        )


def as_conditioning(c: Conditioning | torch.Tensor) -> Conditioning:
    """A Conditioning from one, or from SD-style text embeddings alone."""
    return c if isinstance(c, Conditioning) else Conditioning(c)


class Denoiser:
    """What the method calls: `denoiser(z, t, cond)` (the model's prediction), `in_channels`, and
    `capture(...)`, the concept map's recording (`capture` below) on `module`."""

    module: torch.nn.Module
    in_channels: int

    def capture(
        self,
        token_weights: torch.Tensor,
        size: int,
        record_rows: slice | None = None,
        readout: Readout | None = None,
    ):
        return capture(self.module, token_weights, size, record_rows, readout)


class UNetDenoiser(Denoiser):
    """A `UNet2DConditionModel` behind one call (SD 1.x/2.x, toyworld; SDXL with its added conditioning).

    Args:
        unet: the UNet (possibly the fine-tuned m', or torch.compile'd).
        vae_factor: pixels per latent cell, for SDXL's size conditioning (`time_ids`).
    """

    def __init__(self, unet, vae_factor: int = 8):
        self.module = unet
        self.vae_factor = vae_factor
        self.in_channels = unet.config.in_channels

    def __call__(self, z: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        kwargs = {}
        if cond.pooled is not None:
            # SDXL's micro-conditioning: original size, crop top-left, target size, in pixels. The factory
            # renders and reads whole, uncropped canvases, so (h, w, 0, 0, h, w), as the pipeline's default.
            h, w = z.shape[-2] * self.vae_factor, z.shape[-1] * self.vae_factor
            time_ids = torch.tensor([h, w, 0, 0, h, w], device=z.device, dtype=cond.pooled.dtype)
            kwargs["added_cond_kwargs"] = {
                "text_embeds": cond.pooled,
                "time_ids": time_ids.repeat(z.shape[0], 1),
            }
        return self.module(z, t, encoder_hidden_states=cond.hidden, **kwargs).sample


class TransformerDenoiser(Denoiser):
    """An `SD3Transformer2DModel` behind the same call: the flow prediction for (z, t, cond)."""

    def __init__(self, transformer):
        self.module = transformer
        self.in_channels = transformer.config.in_channels

    def __call__(self, z: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        timestep = t.to(z.device).reshape(-1).expand(z.shape[0])
        return self.module(
            hidden_states=z,
            encoder_hidden_states=cond.hidden,
            pooled_projections=cond.pooled,
            timestep=timestep,
            return_dict=False,
        )[0]


class FluxDenoiser(Denoiser):
    """A `FluxTransformer2DModel` behind the same call: (B, C, h, w) latents are packed into 2 x 2 patch
    tokens with their rotary position ids, as `FluxPipeline` packs them, the timestep is scaled to [0, 1],
    the guidance embedding of a guidance-distilled checkpoint (FLUX.1-dev) is given `guidance`, and the
    flow prediction is unpacked to (B, C, h, w)."""

    def __init__(self, transformer, guidance: float = 3.5):
        self.module = transformer
        self.in_channels = transformer.config.in_channels // 4  # a token is a 2 x 2 patch of latent cells
        self.guidance = guidance

    @staticmethod
    def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
        """(h * w, 3) rotary position ids of the packed image tokens: (0, row, column)."""
        ids = torch.zeros(h, w, 3, device=device, dtype=dtype)
        ids[..., 1] += torch.arange(h, device=device, dtype=dtype)[:, None]
        ids[..., 2] += torch.arange(w, device=device, dtype=dtype)[None, :]
        return ids.reshape(h * w, 3)

    def __call__(self, z: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        b, c, h, w = z.shape
        packed = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
        timestep = t.to(z.device).reshape(-1).expand(b).to(z.dtype) / 1000  # FLUX takes sigma, not t
        guidance = None
        if self.module.config.guidance_embeds:
            guidance = torch.full((b,), self.guidance, device=z.device, dtype=torch.float32)
        out = self.transformer(packed, timestep, guidance, cond, h // 2, w // 2)
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    def transformer(self, packed, timestep, guidance, cond: Conditioning, h: int, w: int) -> torch.Tensor:
        """The transformer's call on packed tokens of an h x w grid, as `FluxPipeline` makes it."""
        return self.module(
            hidden_states=packed,
            timestep=timestep,
            guidance=guidance,
            pooled_projections=cond.pooled,
            encoder_hidden_states=cond.hidden,
            txt_ids=torch.zeros(cond.hidden.shape[1], 3, device=packed.device, dtype=packed.dtype),
            img_ids=self.image_ids(h, w, packed.device, packed.dtype),
            return_dict=False,
        )[0]


class Flux2Denoiser(FluxDenoiser):
    """A `Flux2Transformer2DModel` (FLUX.2 dev and klein) behind the same call, as `Flux2Pipeline` and
    `Flux2KleinPipeline` call it: the same 2 x 2 packing, four-axis rotary positions (time, row, column,
    sequence: the image at (0, row, column, 0), the text at (0, 0, 0, i)), no pooled vector, the guidance
    embedding where the checkpoint has one (FLUX.2-dev)."""

    def transformer(self, packed, timestep, guidance, cond: Conditioning, h: int, w: int) -> torch.Tensor:
        def ids(*sizes: int) -> torch.Tensor:  # built on the device: no host copy per step
            return torch.cartesian_prod(*(torch.arange(n, device=packed.device) for n in sizes))

        image_ids, text_ids = ids(1, h, w, 1), ids(1, 1, 1, cond.hidden.shape[1])
        return self.module(
            hidden_states=packed,
            encoder_hidden_states=cond.hidden,
            timestep=timestep,
            img_ids=image_ids,
            txt_ids=text_ids,
            guidance=guidance,
            return_dict=False,
        )[0]


class ZImageDenoiser(Denoiser):
    """A `ZImageTransformer2DModel` behind the same call, as `ZImagePipeline` calls it: each sample's latents
    as a (C, 1, h, w) frame and its caption's own tokens (the `Conditioning` mask), the timestep as
    ``(1000 - t) / 1000``, and the prediction negated: the flow prediction for (z, t, cond)."""

    def __init__(self, transformer):
        self.module = transformer
        self.in_channels = transformer.config.in_channels

    def __call__(self, z: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        timestep = (1000 - t.to(z.device).reshape(-1).expand(z.shape[0]).to(z.dtype)) / 1000
        captions = [h[m] for h, m in zip(cond.hidden, cond.mask.bool(), strict=True)]
        out = self.module(list(z.unsqueeze(2).unbind(0)), timestep, captions, return_dict=False)[0]
        return -torch.stack(out).squeeze(2)


def capture(module, token_weights, size: int, record_rows=None, readout: Readout | None = None):
    """The capture of `readout` (default: `image_to_text` on every layer) on a denoiser module: a context
    manager yielding the `AttentionAccumulator` whose `enabled` chooses the recorded steps."""
    if readout is not None and readout.name == "concept_output":
        from factory.method.concept_attention import capture_concept_output

        if denoiser_layout(module) not in ("flux", "flux2", "z_image"):
            raise ValueError("the concept_output readout reads FLUX.1's, FLUX.2's and Z-Image's blocks only")
        return capture_concept_output(module, readout, size, record_rows)
    layers = readout.layers if readout is not None else None
    return capture_concept_attention(module, token_weights, size, record_rows, layers)


def as_denoiser(model) -> Denoiser:
    """A denoiser from one (anything with `__call__(z, t, cond)`, `capture(weights, size, rows, readout=)`
    and `in_channels`, as the classes above), or from a bare UNet (SD-style), SD3, FLUX or Z-Image
    transformer."""
    if hasattr(model, "capture") and hasattr(model, "in_channels"):
        return model
    denoiser = {
        "flux": FluxDenoiser,
        "flux2": Flux2Denoiser,
        "joint": TransformerDenoiser,
        "z_image": ZImageDenoiser,
    }
    return denoiser.get(denoiser_layout(model), UNetDenoiser)(model)


@register_family
class SDFamily:
    """Stable Diffusion 1.x / 2.x (epsilon or v-prediction) and toyworld: one CLIP text encoder, a UNet."""

    name = "sd"
    description = "Stable Diffusion 1.x/2.x and the embedded toyworld model"
    denoiser_name = "unet"  # the pipeline component that denoises
    denoiser_class = "UNet2DConditionModel"  # its diffusers class (its config is read without weights)
    required_components: tuple[str, ...] = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    samplers: tuple[str, ...] = SCHEDULERS.names()  # DDPM noise schedule: epsilon or v, as its config says
    readouts: tuple[str, ...] = ("image_to_text",)  # concept-map readouts served (factory.method.readouts)
    finetuned_inpainting = True  # a fine-tuned m' may inpaint (`inpaint.model`)
    clip_tokenizer_names: tuple[str, ...] = ("tokenizer",)  # their tokens share the text stream's positions
    tokenizer_names: tuple[str, ...] = clip_tokenizer_names
    # Whether an fp16 VAE that says `force_upcast` decodes and encodes in fp32, as the family's diffusers
    # pipeline does: StableDiffusionPipeline never upcasts (SD 1.x/2.x VAEs say force_upcast by default and
    # run in fp16), StableDiffusionXLPipeline does (SDXL's VAE overflows in fp16).
    upcast_vae = False

    def __init__(self, pipe):
        self.pipe = pipe

    @classmethod
    def over_tokenizers(cls, tokenizers: dict) -> SDFamily:
        """This family over a model's tokenizers alone ({component name: tokenizer}, no weights:
        `loading.load_tokenizers`): its `token_weights` finds a concept's tokens as with the loaded
        pipeline, in the prompt as the encoder receives it (a chat template included) and within the text
        tokens that reach the model. What the preflight checks prompts with."""
        from types import SimpleNamespace

        return cls(
            SimpleNamespace(**{**dict.fromkeys(("tokenizer", "tokenizer_2", "tokenizer_3")), **tokenizers})
        )

    @classmethod
    def matches(cls, classes: dict[str, str]) -> bool:
        """Whether a pipeline with these component classes ({name: class}) is of this family."""
        return classes.get("unet") == cls.denoiser_class and "text_encoder_2" not in classes

    @classmethod
    def check_sampler(cls, name: str) -> str:
        """`name` if this family samples with it (registered, and served on its noise schedule)."""
        if SCHEDULERS.check(name) not in cls.samplers:
            raise UnsupportedFamilyError(
                f"scheduler {name!r} is not served for a {cls.name} model; choose one of "
                f"{', '.join(cls.samplers)}"
            )
        return name

    @classmethod
    def check_readout(cls, name: str) -> str:
        """`name` if this family's concept map can be read so (registered, and served for it)."""
        if READOUTS.check(name) not in cls.readouts:
            served = [n for n, f in FAMILIES.items() if name in f.readouts]
            raise UnsupportedFamilyError(
                f"readout {name!r} is not served for a {cls.name} model (it is for: {', '.join(served)}); "
                f"choose one of {', '.join(cls.readouts)}"
            )
        return name

    @property
    def denoiser_module(self):
        return getattr(self.pipe, self.denoiser_name)

    @denoiser_module.setter
    def denoiser_module(self, module) -> None:
        setattr(self.pipe, self.denoiser_name, module)

    @property
    def tokenizers(self) -> list:
        """The pipeline's tokenizers that it has (SD3 may come without T5's)."""
        return [t for t in (getattr(self.pipe, n, None) for n in self.tokenizer_names) if t is not None]

    def method_vae(self, vae=None):
        """The VAE the method encodes and decodes with: `vae` (a replacement) or the pipeline's, in fp32 where
        the family's pipeline upcasts it (`upcast_vae`). An upcast is a copy: the shared pipeline keeps its
        own VAE and dtype, so plain generation with it (e.g. `factory bench`'s baseline) still works."""
        import copy

        vae = vae if vae is not None else self.pipe.vae
        if self.upcast_vae and vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            vae = copy.deepcopy(vae).to(torch.float32)
        return vae

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    def denoiser(self, module=None) -> UNetDenoiser | TransformerDenoiser:
        return UNetDenoiser(module if module is not None else self.denoiser_module, self.vae_factor)

    def native_resolution(self) -> int:
        return self.denoiser_module.config.sample_size * self.vae_factor

    def schedule_config(self, scheduler, resolution: int, steps: int) -> dict:
        """The config of the model's `scheduler` (with its class) as the method samples with it at
        `resolution` in `steps` steps: FLUX fixes its resolution-dependent shift here."""
        return {**scheduler.config, "_class_name": type(scheduler).__name__}

    @property
    def resolution_multiple(self) -> int:
        """What a canvas side must be a multiple of: the VAE factor times the denoiser's patch size."""
        return self.vae_factor * getattr(self.denoiser_module.config, "patch_size", 1)

    def encode(self, prompts: list[str]) -> Conditioning:
        """The prompts' embeddings, as the family's pipeline computes them."""
        return Conditioning(encode_prompts(self.pipe.tokenizer, self.pipe.text_encoder, prompts))

    def encode_negative(self, prompts: list[str]) -> Conditioning:
        """The embeddings of a guidance's negative branch: the pipelines encode a negative prompt as any
        other (`""` is their unconditional branch)."""
        return self.encode(prompts)

    def token_weights(self, prompts: list[str], words: list[list[str]]) -> torch.Tensor:
        """(B, text tokens): 1 at the concept words' tokens in any of the CLIP tokenizers (SDXL's two are
        both CLIP BPE, so at the same positions; where they differ the union is read)."""
        tokenizers = [getattr(self.pipe, n) for n in self.clip_tokenizer_names]
        weights = [token_weight_matrix(tok, prompts, words) for tok in tokenizers]
        if len({w.shape for w in weights}) > 1:
            raise UnsupportedFamilyError(
                f"{self.name} tokenizers of different lengths ({', '.join(str(w.shape[1]) for w in weights)} "
                "positions)"
            )
        return torch.stack(weights).amax(0)


@register_family
class SDXLFamily(SDFamily):
    """SDXL: two CLIP text encoders (their penultimate hidden states concatenated per token, the second's
    pooled embedding) and a UNet with added conditioning; the concept's tokens are found in both
    tokenizers."""

    name = "sdxl"
    description = "SDXL"
    required_components = SDFamily.required_components + ("text_encoder_2", "tokenizer_2")
    clip_tokenizer_names = ("tokenizer", "tokenizer_2")
    tokenizer_names = clip_tokenizer_names
    upcast_vae = True

    @classmethod
    def matches(cls, classes: dict[str, str]) -> bool:
        return classes.get("unet") == cls.denoiser_class and "text_encoder_2" in classes

    def encode(self, prompts: list[str]) -> Conditioning:
        with torch.no_grad():
            emb, _, pooled, _ = self.pipe.encode_prompt(
                prompts, device=self.pipe.text_encoder_2.device, do_classifier_free_guidance=False
            )
        return Conditioning(emb, pooled)

    def encode_negative(self, prompts: list[str]) -> Conditioning:
        cond = self.encode(prompts)
        if self.pipe.config.force_zeros_for_empty_prompt and all(p == "" for p in prompts):
            # the pipeline's own unconditional branch for no negative prompt, as SDXL base says
            return Conditioning(torch.zeros_like(cond.hidden), torch.zeros_like(cond.pooled))
        return cond


@register_family
class SD3Family(SDFamily):
    """Stable Diffusion 3 / 3.5 (MMDiT): the text stream is [CLIP-L | CLIP-G per token, zero-padded to the
    joint width] then T5's tokens (zeros where the pipeline has no T5), and the concept map is read from the
    joint attention's image-to-text block (`factory.method.attention.JointConceptAttnProcessor`). Rectified
    flow: its samplers are the flow-matching Euler scheduler."""

    name = "sd3"
    description = "Stable Diffusion 3 / 3.5"
    denoiser_name = "transformer"
    denoiser_class = "SD3Transformer2DModel"
    required_components = (
        "transformer",
        "vae",
        "text_encoder",
        "tokenizer",
        "text_encoder_2",
        "tokenizer_2",
        "scheduler",
    )  # T5 (text_encoder_3) is optional, as in the pipeline
    samplers = FLOW_SCHEDULERS  # rectified flow: both names are its flow-matching Euler sampler
    finetuned_inpainting = True  # Step 3 trains its transformer on the flow-matching objective
    clip_tokenizer_names = ("tokenizer", "tokenizer_2")
    tokenizer_names = ("tokenizer", "tokenizer_2", "tokenizer_3")
    max_sequence_length = 256  # T5 tokens, the pipeline's default

    @classmethod
    def matches(cls, classes: dict[str, str]) -> bool:
        return classes.get("transformer") == cls.denoiser_class

    def denoiser(self, module=None) -> UNetDenoiser | TransformerDenoiser:
        return TransformerDenoiser(module if module is not None else self.denoiser_module)

    def encode(self, prompts: list[str]) -> Conditioning:
        with torch.no_grad():
            emb, _, pooled, _ = self.pipe.encode_prompt(
                prompts,
                None,
                None,
                device=self.pipe.text_encoder.device,
                do_classifier_free_guidance=False,
                max_sequence_length=self.max_sequence_length,
            )
        return Conditioning(emb, pooled)

    def token_weights(self, prompts: list[str], words: list[list[str]]) -> torch.Tensor:
        clip = super().token_weights(prompts, words)
        if self.pipe.tokenizer_3 is None:  # no T5: its tokens are zeros, never a concept's
            t5 = torch.zeros(len(prompts), self.max_sequence_length)
        else:
            # T5's first 256 tokens reach the model: a concept beyond them is an error, not dropped
            t5 = token_weight_matrix(self.pipe.tokenizer_3, prompts, words, self.max_sequence_length)
        return torch.cat([clip, t5], 1)


@register_family
class FluxFamily(SDFamily):
    """FLUX.1 (dev, schnell and their fine-tunes): a rectified-flow transformer of double-stream blocks
    (separate text and image weights, one joint attention) and single-stream blocks (one stream over
    [text; image]), conditioned on T5's tokens and CLIP's pooled embedding, over 2 x 2-packed latents with
    rotary positions (`FluxDenoiser`). The concept's tokens are found in T5's tokenizer: CLIP gives only the
    pooled vector. The concept map is the image-to-text attention of every block
    (`factory.method.attention.FluxConceptAttnProcessor`).

    The flow's shift depends on the image's token count (FLUX's `use_dynamic_shifting`); the method samples
    at one resolution per Distiller, so the shift is computed once for it, as `FluxPipeline` computes `mu`,
    and the scheduler is given it as a fixed shift (`schedule_config`: the same sigmas). Departure: the
    sampler's grid is the scheduler's own `set_timesteps(n)`, where the pipeline passes
    `linspace(1, 1/n, n)`; the two differ slightly at the low-noise end."""

    name = "flux"
    description = "FLUX.1"
    denoiser_name = "transformer"
    denoiser_class = "FluxTransformer2DModel"
    required_components = SD3Family.required_components  # the same seven; T5 (text_encoder_2) included
    samplers = FLOW_SCHEDULERS
    readouts = ("image_to_text", "concept_output")
    finetuned_inpainting = True
    tokenizer_names = ("tokenizer", "tokenizer_2")
    max_sequence_length = 512  # T5 tokens, the pipeline's default (at most the tokenizer's own length)
    guidance = 3.5  # the guidance embedding of a guidance-distilled checkpoint, the pipeline's default

    def __init__(self, pipe):
        super().__init__(pipe)
        self._words: dict = {}  # `concept_streams`' word -> `word_states(word)`

    @classmethod
    def matches(cls, classes: dict[str, str]) -> bool:
        return classes.get("transformer") == cls.denoiser_class

    @property
    def sequence_length(self) -> int:
        return min(self.max_sequence_length, self.pipe.tokenizer_2.model_max_length)

    def denoiser(self, module=None) -> FluxDenoiser:
        return FluxDenoiser(module if module is not None else self.denoiser_module, self.guidance)

    def native_resolution(self) -> int:
        """The VAE config's `sample_size` (1024 for FLUX.1's, as `FluxPipeline`'s default 128 x 8; 64 for the
        toyworld DiT), else the pipeline's default."""
        size = getattr(self.pipe.vae.config, "sample_size", None) if self.pipe.vae is not None else None
        return (
            size
            if isinstance(size, int)
            else getattr(self.pipe, "default_sample_size", 128) * self.vae_factor
        )

    @property
    def resolution_multiple(self) -> int:
        return 2 * self.vae_factor  # latents are packed in 2 x 2 patches

    def schedule_config(self, scheduler, resolution: int, steps: int) -> dict:
        import math

        config = super().schedule_config(scheduler, resolution, steps)
        if config.get("use_dynamic_shifting"):
            tokens = (resolution // self.vae_factor // 2) ** 2
            config.update(use_dynamic_shifting=False, shift=math.exp(self.shift_mu(config, tokens, steps)))
        return config  # exp(mu) as a fixed shift: the same sigmas as the dynamic shift with mu

    @staticmethod
    def shift_mu(config: dict, tokens: int, steps: int) -> float:
        """The dynamic shift's mu for `tokens` image tokens: `FluxPipeline`'s `calculate_shift`, linear in
        the token count between the config's base and max shifts."""
        lo, hi = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
        slope = (config.get("max_shift", 1.15) - config.get("base_shift", 0.5)) / (hi - lo)
        return tokens * slope + config.get("base_shift", 0.5) - slope * lo

    def encode(self, prompts: list[str]) -> Conditioning:
        with torch.no_grad():
            emb, pooled, _ = self.pipe.encode_prompt(
                prompts,
                prompt_2=None,
                device=self.pipe.text_encoder_2.device,
                max_sequence_length=self.sequence_length,
            )
        return Conditioning(emb, pooled)

    def token_weights(self, prompts: list[str], words: list[list[str]]) -> torch.Tensor:
        """(B, T5 tokens): 1 at the concept words' T5 tokens (every piece of a word the tokenizer splits)."""
        # the T5 tokens that reach the model: a concept beyond them is an error, not dropped
        return token_weight_matrix(self.pipe.tokenizer_2, prompts, words, self.sequence_length)

    def concept_streams(self, words: list[list[str]], background: tuple[str, ...]):
        """The `concept_output` readout's word streams of a batch (`ConceptStreams`): each sample's concept
        words (one concept: all their tokens) and the background words, each word encoded alone, as
        ConceptAttention embeds them (`word_states`, each word encoded once per family: the text encoders are
        large and a job has a few words); every token of a word is kept. A word with no tokens, or one that
        the tokenizer can only spell with its unknown token, raises ConceptTokenError."""
        from factory.method.concept_attention import ConceptStreams

        self.check_readout("concept_output")  # families built on this one that do not serve it refuse here
        rows = []
        for concept_words in words:
            entries = []  # (word index, states of its tokens, their positions)
            for w, group in enumerate([list(concept_words), *[[b] for b in background]]):
                for word in group:
                    if word not in self._words:
                        self._words[word] = self.word_states(word)
                    entries.append((w, *self._words[word]))
            rows.append(entries)
        n = max(sum(len(e[1]) for e in entries) for entries in rows)
        n_words = 1 + len(background)
        first = rows[0][0][1]
        tokens = torch.zeros(len(rows), n, first.shape[-1], device=first.device, dtype=first.dtype)
        groups = torch.zeros(len(rows), n, n_words, device=first.device)
        positions = torch.zeros(len(rows), n, dtype=torch.long, device=first.device)
        for r, entries in enumerate(rows):
            at = 0
            counts = torch.zeros(n_words)
            for w, states, _ in entries:
                counts[w] += len(states)
            for w, states, where in entries:
                tokens[r, at : at + len(states)] = states
                groups[r, at : at + len(states), w] = 1.0 / counts[w]
                if where is not None:
                    positions[r, at : at + len(states)] = where
                at += len(states)
        has_positions = rows[0][0][2] is not None
        return ConceptStreams(tokens=tokens, groups=groups, positions=positions if has_positions else None)

    def word_states(self, word: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(tokens, D) T5's states of `word` encoded alone (its special tokens run with it, not kept), and
        no positions: FLUX.1's text positions are all zero."""
        tokenizer, encoder = self.pipe.tokenizer_2, self.pipe.text_encoder_2
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if not ids or (tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids):
            raise ConceptTokenError(
                f"the word {word!r} has no tokens of its own in this model's T5 tokenizer; choose another"
            )
        full = tokenizer(word)["input_ids"]  # with the special tokens T5 adds (its end-of-text)
        at = next(i for i in range(len(full)) if full[i : i + len(ids)] == ids)
        with torch.no_grad():
            states = encoder(torch.tensor([full], device=encoder.device))[0]
        return states[0, at : at + len(ids)], None


@register_family
class ZImageFamily(FluxFamily):
    """Z-Image (Tongyi-MAI's Z-Image and Z-Image-Turbo): a single-stream rectified-flow transformer over 2 x 2
    patches of FLUX.1's VAE latents. Refiner blocks see the image alone and the caption alone, then the main
    layers run one attention over [image; caption] per sample (`ZImageDenoiser`). The caption is Qwen3's
    penultimate hidden states of the prompt in Qwen3's chat template (user turn, generation prompt), only
    the tokens it has; the concept's tokens are found in that templated prompt. The concept map is the
    image-to-caption attention of the main layers (`factory.method.attention.ZImageConceptAttnProcessor`),
    or ConceptAttention's `concept_output` ported to its single-stream layers
    (`factory.method.concept_attention.ZImageConceptOutputProcessor`: each word encoded alone in the chat
    template, through the caption embedder and refiner, then the main layers' shared weights; default: every
    main layer, as ConceptAttention's SD3.5 default reads every MMDiT layer; no trained Z-Image has measured
    it). Its flow schedule and canvas rules are FLUX's (`FluxFamily`: the shift if dynamic, 2 x 2 patches)."""

    name = "z_image"
    description = "Z-Image"
    denoiser_class = "ZImageTransformer2DModel"
    required_components = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    readouts = ("image_to_text", "concept_output")
    tokenizer_names = ("tokenizer",)
    max_sequence_length = 512  # the pipeline's default

    @property
    def sequence_length(self) -> int:
        return self.max_sequence_length

    def denoiser(self, module=None) -> ZImageDenoiser:
        return ZImageDenoiser(module if module is not None else self.denoiser_module)

    enable_thinking = True  # ZImagePipeline's chat template call

    def templated(self, prompt: str) -> str:
        """`prompt` as the pipeline hands it to Qwen3: one user turn in the chat template, the generation
        prompt, thinking as the pipeline sets it (`enable_thinking`)."""
        return chat_templated(self.pipe.tokenizer, prompt, self.enable_thinking)

    def encode(self, prompts: list[str]) -> Conditioning:
        """The pipeline's caption embeddings, each its own length, zero-padded to the longest with a mask."""
        with torch.no_grad():
            embeds, _ = self.pipe.encode_prompt(
                list(prompts),  # a copy: the pipeline writes the templated prompts into the list it is given
                device=self.pipe.text_encoder.device,
                do_classifier_free_guidance=False,
                max_sequence_length=self.sequence_length,
            )
        hidden = torch.nn.utils.rnn.pad_sequence(embeds, batch_first=True)
        hidden = torch.nn.functional.pad(hidden, (0, 0, 0, self.sequence_length - hidden.shape[1]))
        lengths = torch.tensor([len(e) for e in embeds], device=hidden.device)
        mask = torch.arange(self.sequence_length, device=hidden.device) < lengths[:, None]
        return Conditioning(hidden, None, mask)

    def token_weights(self, prompts: list[str], words: list[list[str]]) -> torch.Tensor:
        """(B, caption tokens): 1 at the concept words' tokens in the templated prompt."""
        templated = [self.templated(p) for p in prompts]
        return token_weight_matrix(self.pipe.tokenizer, templated, words, self.sequence_length)

    def word_states(self, word: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, D) the caption states of `word`'s tokens in its own templated prompt (the word alone in
        the chat template, as `encode` makes a prompt's), and their positions there."""
        at = self.token_weights([word], [[word]])[0].nonzero()[:, 0]
        states = self.encode([word]).hidden[0]
        return states[at], at.to(states.device)


@register_family
class Flux2Family(FluxFamily):
    """FLUX.2 (dev, and the klein models with their base variants): a rectified-flow transformer of
    double- and single-stream blocks as FLUX.1's (`Flux2Transformer2DModel`: wider MLPs, no biases, the
    modulation shared across blocks), over 2 x 2-packed latents of FLUX.2's VAE with four-axis rotary
    positions (`Flux2Denoiser`). The text stream is one encoder's hidden states from three of its layers,
    stacked per token, of the prompt in the encoder's chat template padded to 512 tokens: Mistral-3 with
    FLUX.2's system message (`Flux2Pipeline`), or Qwen3 with thinking off (`Flux2KleinPipeline`); the
    concept's tokens are found in that templated prompt. No pooled vector. The concept map is the
    image-to-text attention of every block (`factory.method.attention.Flux2ConceptAttnProcessor`), or
    ConceptAttention's `concept_output` (`factory.method.concept_attention`; each word encoded alone in the
    chat template, its tokens kept with their text positions; default blocks: the last three double-stream
    ones, 5-7 of FLUX.2-dev's 8, ConceptAttention's FLUX.2 default).

    FLUX.2's VAE latents are normalized by the VAE's batch-norm statistics (`PatchNormedVAE`). The flow's
    shift depends on the image's token count and the step count (`Flux2Pipeline`'s `compute_empirical_mu`);
    each sampler's schedule is computed for its own steps. The sigma grid is the scheduler's own, as for
    FLUX.1 (the same departure). The guidance embedding of FLUX.2-dev is given the pipeline's default 4.0;
    klein has none.

    Not served: reference-image conditioning (the pipelines' `image=`), which the method does not use."""

    name = "flux2"
    description = "FLUX.2 (dev, klein)"
    denoiser_class = "Flux2Transformer2DModel"
    required_components = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    readouts = ("image_to_text", "concept_output")
    tokenizer_names = ("tokenizer",)
    max_sequence_length = 512  # the pipelines' default
    guidance = 4.0  # Flux2Pipeline's default guidance_scale, which it gives the guidance embedding

    @property
    def sequence_length(self) -> int:
        return self.max_sequence_length

    @property
    def klein(self) -> bool:
        """A Qwen3-encoded klein pipeline (else FLUX.2-dev's Mistral-3 one)."""
        return not hasattr(self.pipe.tokenizer, "tokenizer")  # dev's is a processor around its tokenizer

    @property
    def text_tokenizer(self):
        return self.pipe.tokenizer if self.klein else self.pipe.tokenizer.tokenizer

    def denoiser(self, module=None) -> Flux2Denoiser:
        return Flux2Denoiser(module if module is not None else self.denoiser_module, self.guidance)

    def method_vae(self, vae=None):
        from factory.method.latents import PatchNormedVAE

        return PatchNormedVAE(super().method_vae(vae))

    @staticmethod
    def shift_mu(config: dict, tokens: int, steps: int) -> float:
        """`Flux2Pipeline`'s `compute_empirical_mu`: fitted to the token and the step count."""
        a1, b1, a2, b2 = 8.73809524e-05, 1.89833333, 0.00016927, 0.45666666
        if tokens > 4300:
            return a2 * tokens + b2
        m_200, m_10 = a2 * tokens + b2, a1 * tokens + b1
        a = (m_200 - m_10) / 190.0
        return a * steps + m_200 - 200.0 * a

    def templated(self, prompt: str) -> str:
        """`prompt` as the pipeline hands it to its encoder, in the encoder's chat template."""
        if self.klein:  # Flux2KleinPipeline: Qwen3, thinking off
            return chat_templated(self.pipe.tokenizer, prompt, enable_thinking=False)
        from diffusers.pipelines.flux2.pipeline_flux2 import SYSTEM_MESSAGE, format_input

        # (a pipeline's own system message; the tokenizers alone, as the preflight has them: the default)
        (messages,) = format_input(
            [prompt], system_message=getattr(self.pipe, "system_message", SYSTEM_MESSAGE)
        )
        return self.pipe.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)

    def encode(self, prompts: list[str]) -> Conditioning:
        with torch.no_grad():
            embeds, _ = self.pipe.encode_prompt(
                list(prompts), device=self.pipe.text_encoder.device, max_sequence_length=self.sequence_length
            )
        return Conditioning(embeds)

    def token_weights(self, prompts: list[str], words: list[list[str]]) -> torch.Tensor:
        """(B, text tokens): 1 at the concept words' tokens in the templated prompt."""
        templated = [self.templated(p) for p in prompts]
        tokenizer = self.text_tokenizer
        # FLUX.2-dev's processor tokenizes a templated prompt that starts with the BOS without special
        # tokens (transformers' `ProcessorMixin.apply_chat_template`); klein's tokenizer is called plainly
        bos = tokenizer.bos_token
        special = self.klein or not (bos and templated[0].startswith(bos))
        return token_weight_matrix(tokenizer, templated, words, self.sequence_length, special)

    word_states = ZImageFamily.word_states  # the word alone in the chat template, its tokens' positions


def detect_family(pipe) -> SDFamily:
    """The family of a loaded pipeline, from its components."""
    index = {}
    for name in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            module = getattr(module, "_orig_mod", module)  # a torch.compile'd module
            index[name] = [type(module).__module__.split(".")[0], type(module).__name__]
    index["_class_name"] = type(pipe).__name__
    return FAMILIES[family_name_of_index(index, f"this {type(pipe).__name__}")](pipe)
