"""Tiny random-weight pipelines of every family the factory serves, built as diffusers' own fast tests build
theirs (a few thousand parameters, 32 px): SD 2.x-style (v-prediction, linear projections, an OpenCLIP-style
pad token), SDXL, SD3, FLUX.1, Z-Image, FLUX.2 klein and FLUX.2-dev. The CLIP tokenizer is toyworld's (no hub
here); the Qwen3 tokenizer (Z-Image, klein) and the Mistral-3 one (FLUX.2-dev) are byte-level BPEs trained
here on the grammar's words, with their models' chat templates; toyworld's own pipeline is the SD 1.x case.
Their images and masks are noise: they check code paths and shapes, not quality.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
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
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PixtralImageProcessor,
    PixtralProcessor,
    PixtralVisionConfig,
    PreTrainedTokenizerFast,
    Qwen2TokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3Model,
    T5Config,
    T5EncoderModel,
)

from factory.method.loading import SHORT_NAMES
from factory.toyworld.model import FLUX_SCHEDULE

FAMILY_BUILDS = (
    "sd2",
    "sdxl",
    "sd3",
    "flux",
    "z_image",
    "flux2_klein",
    "flux2_dev",
)  # toyworld is the SD 1.x case


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


def flux_pipeline(num_layers: int = 1, num_single_layers: int = 1) -> FluxPipeline:
    """FLUX.1-dev-shaped: `num_layers` double- and `num_single_layers` single-stream blocks with rotary
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
        num_single_layers=num_single_layers,
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


def z_image_pipeline(num_layers: int = 2) -> ZImagePipeline:
    """Z-Image-shaped: a single-stream transformer (one noise refiner, one context refiner, `num_layers`
    main layers over [image; caption], 2 x 2 patches, 3-axis rotary positions), a Qwen3 text encoder read
    at its penultimate layer through the chat template, a shifted VAE, Z-Image-Turbo's flow scheduler
    (shift 3)."""
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
        n_layers=num_layers,
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


# Mistral-3's chat template, as far as Flux2Pipeline uses it: the BOS, the system turn, the user turn; a
# message's content is a list of text parts
MISTRAL3_CHAT_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}{%- if message['content'] is string %}"
    "{%- set text = message['content'] %}{%- else %}{%- set text = message['content'] | "
    "selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}{%- endif %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' + text + '[/INST]' }}{%- endif %}{%- endfor %}"
)


def mistral3_processor() -> PixtralProcessor:
    """A Mistral-3-style processor: a byte-level BPE trained on the grammar's words with Mistral's special
    tokens, which prefixes the BOS when asked for special tokens (as Mistral's tokenizer does; the chat
    template writes one itself), and Pixtral's image processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from factory.toyworld.world import vocabulary

    specials = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
    specials += ["[IMG]", "[IMG_BREAK]", "[IMG_END]"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([" " + " ".join(vocabulary())] * 4 + [" fire truck"] * 2, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.chat_template = MISTRAL3_CHAT_TEMPLATE
    return PixtralProcessor(
        image_processor=PixtralImageProcessor(),
        tokenizer=fast,
        patch_size=4,
        spatial_merge_size=1,
        chat_template=MISTRAL3_CHAT_TEMPLATE,
    )


def flux2_transformer(
    joint_attention_dim: int, guidance_embeds: bool, num_layers: int = 1, num_single_layers: int = 1
) -> Flux2Transformer2DModel:
    """`num_layers` double-stream and `num_single_layers` single-stream FLUX.2 blocks, four-axis rotary
    positions, over 2 x 2-packed latents of 4 channels."""
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels x a 2 x 2 patch
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=joint_attention_dim,
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=guidance_embeds,
    )


def flux2_vae() -> AutoencoderKLFlux2:
    """A two-level FLUX.2 VAE, its batch-norm statistics set away from (0, 1) so that their use shows."""
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=32,
    )
    vae.bn.running_mean.copy_(torch.linspace(-0.5, 0.5, 16))
    vae.bn.running_var.copy_(torch.linspace(0.5, 2.0, 16))
    return vae


def flux2_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.2's flow-matching scheduler: the dynamic shift (the pipelines pass `mu`)."""
    return FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=4096,
        max_shift=1.15,
        shift=3.0,
        use_dynamic_shifting=True,
        time_shift_type="exponential",
    )


def flux2_klein_pipeline(num_layers: int = 1, num_single_layers: int = 1) -> Flux2KleinPipeline:
    """FLUX.2-klein-shaped: the FLUX.2 blocks without a guidance embedding, a Qwen3 causal LM read at
    layers 9, 18 and 27 (the pipeline's) through the chat template with thinking off."""
    torch.manual_seed(0)
    tok = qwen_tokenizer()
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tok),
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=27,  # the pipeline stacks hidden states 9, 18 and 27
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=512,
        )
    )
    pipe = Flux2KleinPipeline(
        scheduler=flux2_scheduler(),
        vae=flux2_vae(),
        text_encoder=text_encoder,
        tokenizer=tok,
        transformer=flux2_transformer(
            48, guidance_embeds=False, num_layers=num_layers, num_single_layers=num_single_layers
        ),  # 3 layers of 16
    )
    return _ready(pipe)


def flux2_dev_pipeline(num_layers: int = 1, num_single_layers: int = 1) -> Flux2Pipeline:
    """FLUX.2-dev-shaped: the FLUX.2 blocks with the guidance embedding, a Mistral-3 (Pixtral vision tower,
    Mistral text model) read at layers 10, 20 and 30 (the pipeline's) of the prompt in its chat template
    with FLUX.2's system message."""
    torch.manual_seed(0)
    processor = mistral3_processor()
    tok = processor.tokenizer
    text = MistralConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=30,  # the pipeline stacks hidden states 10, 20 and 30
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=1024,
    )
    vision = PixtralVisionConfig(
        hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=32
    )
    vision.patch_size, vision.head_dim = 4, 8
    encoder = Mistral3ForConditionalGeneration(
        Mistral3Config(
            text_config=text,
            vision_config=vision,
            image_token_index=tok.convert_tokens_to_ids("[IMG]"),
            spatial_merge_size=1,
        )
    )
    pipe = Flux2Pipeline(
        scheduler=flux2_scheduler(),
        vae=flux2_vae(),
        text_encoder=encoder,
        tokenizer=processor,
        transformer=flux2_transformer(
            48, guidance_embeds=True, num_layers=num_layers, num_single_layers=num_single_layers
        ),
    )
    return _ready(pipe)


BUILDERS = {
    "sd2": sd2_pipeline,
    "sdxl": sdxl_pipeline,
    "sd3": sd3_pipeline,
    "flux": flux_pipeline,
    "z_image": z_image_pipeline,
    "flux2_klein": flux2_klein_pipeline,
    "flux2_dev": flux2_dev_pipeline,
}
FAMILY_OF = {
    "sd2": "sd",
    "sdxl": "sdxl",
    "sd3": "sd3",
    "flux": "flux",
    "z_image": "z_image",
    "flux2_klein": "flux2",
    "flux2_dev": "flux2",
}


def _ready(pipe):
    for name in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe
