"""Paper Step 1: the mean cross-attention map of an existing image (the "attention probe").

For each of the T0 least-noisy of T DDIM timesteps the clean latent is noised independently with fresh
noise (no denoising trajectory is followed: paper Eq. 4), one conditional UNet pass is run with the concept
prompt and no guidance, and the concept token's cross-attention is accumulated over all attn2 layers
(`factory.method.attention`). Each timestep is repeated N times. The result is the unweighted mean over
layers x steps x repeats, at latent resolution.

Noise is drawn from one `torch.Generator` per sample, so a sample's noise does not depend on the batch it
is in.
"""

from __future__ import annotations

import torch

from factory.method.families import Conditioning, as_conditioning, as_denoiser
from factory.method.latents import latent_shift, randn
from factory.method.readouts import Readout
from factory.method.schedulers import add_noise


def probe_timesteps(scheduler, num_inference_steps: int = 50, t0: int = 40) -> torch.Tensor:
    """The T0 least-noisy timesteps of the scheduler's T-step inference grid (781, 761, ..., 1 for SD)."""
    if not 0 < t0 <= num_inference_steps:
        raise ValueError(f"t0 must be in 1..num_inference_steps ({num_inference_steps}), got {t0}")
    scheduler.set_timesteps(num_inference_steps)
    return scheduler.timesteps[-t0:].clone()


@torch.no_grad()
def mean_attention_map(
    denoiser,
    scheduler,
    latents: torch.Tensor,
    text_embeddings: Conditioning | torch.Tensor,
    token_weights: torch.Tensor,
    timesteps: torch.Tensor,
    generators: list[torch.Generator],
    repeats: int = 1,
    inpainting_inputs: torch.Tensor | None = None,
    readout: Readout | None = None,
) -> torch.Tensor:
    """(B, h, w) mean attention of the weighted tokens over all attn2 layers, timesteps and repeats.

    denoiser: a `factory.method.families` denoiser, or a bare UNet (SD-style text embeddings).
    inpainting_inputs: for a 9-channel inpainting UNet, the 5 channels it takes beside the noised latents
        ([region, masked-image latents], `repaint_everything`), concatenated to each of them.
    readout: the concept map's readout (`factory.method.readouts`); default: `image_to_text`, every layer."""
    if len(generators) != latents.shape[0]:
        raise ValueError("one generator per sample is required")
    denoiser, cond = as_denoiser(denoiser), as_conditioning(text_embeddings)
    size = latents.shape[-1]
    with denoiser.capture(token_weights.to(latents.device), size, readout=readout) as acc:
        for t in timesteps:
            for _ in range(repeats):
                noise = randn(latents.shape[1:], generators, latents.device, latents.dtype)
                t_batch = t.reshape(1).expand(latents.shape[0]).to(latents.device)
                z_t = add_noise(scheduler, latents, noise, t_batch)
                if inpainting_inputs is not None:
                    z_t = torch.cat([z_t, inpainting_inputs], 1)
                denoiser(z_t, t_batch, cond)
        return acc.mean()


@torch.no_grad()
def repaint_everything(vae, latents: torch.Tensor) -> torch.Tensor:
    """What a 9-channel inpainting UNet takes beside the latents to paint the whole canvas from the prompt,
    as diffusers' inpainting pipelines build it for a mask of ones: [region = 1, latents of the masked
    image, which is all zeros (grey)]. With it the probe reads an inpainting model's attention as it would
    a text-to-image model's."""
    b, _, h, w = latents.shape
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    grey = torch.zeros(1, 3, h * factor, w * factor, device=vae.device, dtype=vae.dtype)
    blank = (vae.encode(grey).latent_dist.mode() - latent_shift(vae)) * vae.config.scaling_factor
    region = torch.ones(b, 1, h, w, device=latents.device, dtype=latents.dtype)
    return torch.cat([region, blank.to(latents.device, latents.dtype).expand(b, -1, -1, -1)], 1)
