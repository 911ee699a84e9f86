"""Tiny random-weight pipelines of every family the factory serves, built as diffusers' own fast tests build
theirs (a few thousand parameters, 32 px): SD 2.x-style (v-prediction, linear projections, an OpenCLIP-style
pad token), SDXL, SD3, FLUX.1 and Z-Image. The CLIP tokenizer is toyworld's (no hub here); Z-Image's Qwen3
tokenizer is a byte-level BPE trained here on the grammar's words, with Qwen3's chat template; toyworld's
own pipeline is the SD 1.x case. Their images and masks are noise: they check code paths and shapes, not
quality.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Qwen2TokenizerFast,
    Qwen3Config,
    Qwen3Model,
    T5Config,
    T5EncoderModel,
)

from factory.method.loading import SHORT_NAMES
from factory.toyworld.model import FLUX_SCHEDULE

FAMILY_BUILDS = ("sd2", "sdxl", "sd3", "flux", "z_image")  # toyworld is the SD 1.x case


def tokenizer(openclip_pad: bool = False) -> CLIPTokenizer:
    tok = CLIPTokenizer.from_pretrained(SHORT_NAMES["toyworld"] / "tokenizer")
    if openclip_pad:  # SD 2.x's OpenCLIP tokenizer pads with token 0 ("!") where SD 1.x pads with EOS
        tok.pad_token = tok.convert_ids_to_tokens(0)
    return tok


def clip_config(tok: CLIPTokenizer, hidden: int = 32, projection: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=tok.model_max_length,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        projection_dim=projection,
        hidden_act="gelu",
    )


def vae(latent_channels: int = 4, **kwargs) -> AutoencoderKL:
    """A two-level VAE: 32 px images, 16 x 16 latents."""
    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=32,
        **kwargs,
    )


def unet(**kwargs) -> UNet2DConditionModel:
    """A two-level UNet on 16 x 16 latents with linear projections and per-level head dims (SD 2.x's and
    SDXL's layout); `kwargs` give the blocks and the conditioning."""
    return UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        norm_num_groups=4,
        **kwargs,
    )


def sd2_pipeline() -> StableDiffusionPipeline:
    """SD 2.x-shaped: v-prediction, linear projections, per-level head dims, OpenCLIP-style padding."""
    torch.manual_seed(0)
    tok = tokenizer(openclip_pad=True)
    denoiser = unet(
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction",
    )
    pipe = StableDiffusionPipeline(
        vae=vae(),
        text_encoder=CLIPTextModel(clip_config(tok)),
        tokenizer=tok,
        unet=denoiser,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _ready(pipe)


def sdxl_pipeline() -> StableDiffusionXLPipeline:
    """SDXL-shaped: two text encoders (the second with a projection: the pooled embedding), a UNet with
    `text_time` added conditioning, a VAE that asks for fp32 (`force_upcast`)."""
    torch.manual_seed(0)
    tok = tokenizer()
    denoiser = unet(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six size ids x 8 + the pooled embedding
        cross_attention_dim=64,  # the two encoders' hidden states side by side
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae(force_upcast=True),
        text_encoder=CLIPTextModel(clip_config(tok)),
        text_encoder_2=CLIPTextModelWithProjection(clip_config(tok)),
        tokenizer=tok,
        tokenizer_2=tokenizer(),
        unet=denoiser,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )
    return _ready(pipe)


def sd3_pipeline() -> StableDiffusion3Pipeline:
    """SD3.5-shaped: an MMDiT with joint attention over image and text tokens (RMS-normed queries and keys,
    one block with SD3.5's extra image-only attention), two CLIP encoders (no T5, as the SD3 pipeline
    allows), a shifted VAE, the flow-matching scheduler."""
    torch.manual_seed(0)
    tok = tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,  # the two CLIPs' 16 + 16 per token
        caption_projection_dim=32,
        pooled_projection_dim=64,  # the two CLIPs' pooled 32 + 32
        out_channels=4,
        pos_embed_max_size=16,
        qk_norm="rms_norm",  # SD3.5's: RMS-normed queries and keys
        dual_attention_layers=(0,),  # SD3.5's: block 0 has a second, image-only attention (not read)
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae(shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=CLIPTextModelWithProjection(clip_config(tok, hidden=16)),
        tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(clip_config(tok, hidden=16)),
        tokenizer_2=tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )
    return _ready(pipe)


def flux_pipeline(num_layers: int = 1) -> FluxPipeline:
    """FLUX.1-dev-shaped: `num_layers` double-stream blocks and one single-stream block with rotary
    positions over 2 x 2-packed latents, the guidance embedding, CLIP (pooled only) and a T5 encoder (its
    tokens; toyworld's CLIP tokenizer stands in for T5's, with a vocabulary to match), a shifted VAE, and
    FLUX.1-dev's flow-matching scheduler with the resolution-dependent shift. Native size 16 latent cells
    (the pipeline says 128: set on this instance, so a saved copy needs `sampler.resolution`)."""
    torch.manual_seed(0)
    tok = tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels x a 2 x 2 patch
        num_layers=num_layers,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5's d_model
        pooled_projection_dim=32,  # CLIP's pooled
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    )
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4))
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULE)  # FLUX.1's, as the toyworld DiT's
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae(shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=CLIPTextModel(clip_config(tok)),
        tokenizer=tok,
        text_encoder_2=t5,
        tokenizer_2=tokenizer(),
    )
    pipe.default_sample_size = 16
    return _ready(pipe)


# Qwen3's chat template, as far as ZImagePipeline uses it: one user turn, the generation prompt, and the
# empty thinking block when thinking is off
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)


def qwen_tokenizer() -> Qwen2TokenizerFast:
    """A Qwen-style byte-level BPE (Qwen3's special tokens and chat template) trained on the toyworld
    grammar's words: a word after a space is one "Ġword" token, as in Qwen's vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from factory.toyworld.world import vocabulary

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([" " + " ".join(vocabulary())] * 4 + [" user assistant fire truck"] * 2, trainer)
    qwen = Qwen2TokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    qwen.chat_template = QWEN3_CHAT_TEMPLATE
    return qwen


def z_image_pipeline() -> ZImagePipeline:
    """Z-Image-shaped: a single-stream transformer (one noise refiner, one context refiner, two main layers
    over [image; caption], 2 x 2 patches, 3-axis rotary positions), a Qwen3 text encoder read at its
    penultimate layer through the chat template, a shifted VAE, Z-Image-Turbo's flow scheduler (shift 3)."""
    torch.manual_seed(0)
    tok = qwen_tokenizer()
    text_encoder = Qwen3Model(
        Qwen3Config(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=512,
        )
    )
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=4,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=32,
        axes_dims=[4, 6, 6],
        axes_lens=[256, 32, 32],
    )
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae(shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=text_encoder,
        tokenizer=tok,
        transformer=transformer,
    )
    return _ready(pipe)


BUILDERS = {
    "sd2": sd2_pipeline,
    "sdxl": sdxl_pipeline,
    "sd3": sd3_pipeline,
    "flux": flux_pipeline,
    "z_image": z_image_pipeline,
}
FAMILY_OF = {"sd2": "sd", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux", "z_image": "z_image"}


def _ready(pipe):
    for name in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe
