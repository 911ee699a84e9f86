"""The toyworld foundation model: a Stable-Diffusion-architecture model, small enough to train on a CPU.

The components and their roles are exactly those of Stable Diffusion v1, so `StableDiffusionPipeline`
loads the saved directory and every code path in `factory` treats it like real SD:

- AutoencoderKL: 64x64x3 images <-> 16x16x4 latents (factor 4 instead of SD's 8).
- CLIPTextModel + CLIPTokenizer: a 2-layer, 64-wide causal text transformer over a CLIP-format BPE
  vocabulary built from the toyworld grammar (`factory.toyworld.tokenizer`), 16 token positions.
- UNet2DConditionModel: epsilon prediction, cross-attention at 16x16, 8x8 and the 4x4 middle block.
- DDIMScheduler with the SD v1 schedule (scaled_linear, beta 0.00085..0.012, 1000 steps, offset 1).

The toyworld DiT (`factory/models/toyworld-dit`, `trainers pretrain-toyworld-dit`) is a FLUX.1-architecture
model on the same latents, so `FluxPipeline` loads it and the `flux` family serves it:

- the same AutoencoderKL (its config gains FLUX's `shift_factor`, 0) and the same frozen CLIP text encoder,
  which gives FLUX's pooled vector;
- T5EncoderModel + T5 tokenizer: a 2-layer, 64-wide T5 encoder over a SentencePiece-format (Unigram)
  vocabulary of the grammar's words (`factory.toyworld.tokenizer.write_t5_tokenizer`), 16 positions;
- FluxTransformer2DModel: double- and single-stream blocks over 2 x 2-packed 16x16x4 latents (64 image
  tokens), no guidance embedding (like FLUX.1-schnell);
- FlowMatchEulerDiscreteScheduler with FLUX.1's resolution-dependent shift.
"""

from __future__ import annotations

from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

IMAGE_SIZE = 64
LATENT_SIZE = 16
MAX_TOKENS = 16
SD_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    clip_sample=False,
    set_alpha_to_one=False,
    prediction_type="epsilon",
)


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        mid_block_add_attention=False,
        scaling_factor=1.0,  # replaced by 1/std of the trained latents, as SD did (0.18215)
    )


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=64,
    )
    return CLIPTextModel(config)


UNET_CHANNELS = (32, 64, 64)  # the shipped model's UNet (1.5M parameters)


def check_unet_channels(block_out_channels: tuple[int, ...]) -> None:
    if len(block_out_channels) != 3 or any(c <= 0 or c % 8 for c in block_out_channels):
        raise ValueError(
            "the toyworld UNet takes 3 block widths, each a positive multiple of 8 (its GroupNorm "
            f"groups), e.g. 64,128,128; got {','.join(map(str, block_out_channels))}"
        )


def build_unet(
    block_out_channels: tuple[int, ...] = UNET_CHANNELS, layers_per_block: int = 1
) -> UNet2DConditionModel:
    """The toyworld UNet; wider or deeper ones (`trainers pretrain-toyworld --unet-channels/--unet-layers`)
    keep the block layout: cross-attention in all but the lowest-resolution block, 3 resolutions (16, 8,
    4)."""
    check_unet_channels(block_out_channels)
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        cross_attention_dim=64,
        attention_head_dim=4,  # diffusers' legacy name: the number of heads, as in SD v1's config
        norm_num_groups=8,
    )


def build_train_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**{k: v for k, v in SD_SCHEDULE.items() if k not in ("set_alpha_to_one",)})


def build_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**SD_SCHEDULE)


# ----------------------------------------------------------------------------- the toyworld DiT (FLUX.1)

DIT_WIDTH, DIT_HEADS, DIT_DOUBLE, DIT_SINGLE = 128, 4, 4, 4  # the shipped DiT: 3.5M transformer parameters
T5_WIDTH = 64
FLUX_SCHEDULE = dict(  # FLUX.1's scheduler config: the shift follows the image's token count
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)


def build_t5_encoder(tokenizer) -> T5EncoderModel:
    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=T5_WIDTH,
            d_kv=16,
            d_ff=4 * T5_WIDTH,
            num_layers=2,
            num_heads=4,
            feed_forward_proj="gated-gelu",  # T5 v1.1's, as FLUX's T5-XXL
            is_encoder_decoder=False,
            use_cache=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )


def build_flux_transformer(
    width: int = DIT_WIDTH, heads: int = DIT_HEADS, double: int = DIT_DOUBLE, single: int = DIT_SINGLE
):
    """A FLUX.1 transformer for 4-channel 16x16 latents (tokens: 2 x 2 patches, 16 channels), reading the
    64-wide T5 states and the 64-wide pooled CLIP vector. The rotary axes split the head as FLUX.1's do
    (16 / 56 / 56 of 128: a small first axis, equal row and column axes)."""
    from diffusers import FluxTransformer2DModel

    if width % heads or (width // heads) % 8:
        raise ValueError(f"the DiT's width {width} must split into {heads} heads of a multiple of 8")
    head = width // heads
    side = head * 7 // 16 // 2 * 2  # rotary axes are even
    axes = (head - 2 * side, side, side)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=double,
        num_single_layers=single,
        attention_head_dim=head,
        num_attention_heads=heads,
        joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=64,  # the toyworld CLIP's width
        guidance_embeds=False,
        axes_dims_rope=axes,
    )


def build_flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULE)
