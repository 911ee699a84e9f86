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

from factory.method.attention import capture_concept_attention


def probe_timesteps(scheduler, num_inference_steps: int = 50, t0: int = 40) -> torch.Tensor:
    """The T0 least-noisy timesteps of the scheduler's T-step inference grid (781, 761, ..., 1 for SD)."""
    if not 0 < t0 <= num_inference_steps:
        raise ValueError(f"t0 must be in 1..num_inference_steps ({num_inference_steps}), got {t0}")
    scheduler.set_timesteps(num_inference_steps)
    return scheduler.timesteps[-t0:].clone()


def _randn(shape, generators: list[torch.Generator], device, dtype) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators]).to(
        device, dtype
    )


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """images (B, 3, H, W) in [-1, 1] -> scaled latents, sampled from the posterior (as the paper's code)."""
    # On the CPU one sample at a time, so that a sample's latents do not depend on its batch (see
    # Distiller._decode); on a GPU the whole batch at once.
    x = images.to(vae.device, vae.dtype)
    dists = (
        [vae.encode(xi[None]).latent_dist for xi in x]
        if x.device.type == "cpu"
        else [vae.encode(x).latent_dist]
    )
    mean = torch.cat([d.mean for d in dists])
    std = torch.cat([d.std for d in dists])
    eps = _randn(mean.shape[1:], generators, mean.device, mean.dtype)
    return (mean + std * eps) * vae.config.scaling_factor


@torch.no_grad()
def mean_attention_map(
    unet,
    scheduler,
    latents: torch.Tensor,
    text_embeddings: torch.Tensor,
    token_weights: torch.Tensor,
    timesteps: torch.Tensor,
    generators: list[torch.Generator],
    repeats: int = 1,
) -> torch.Tensor:
    """(B, h, w) mean attention of the weighted tokens over all attn2 layers, timesteps and repeats."""
    if len(generators) != latents.shape[0]:
        raise ValueError("one generator per sample is required")
    size = latents.shape[-1]
    with capture_concept_attention(unet, token_weights.to(latents.device), size) as acc:
        for t in timesteps:
            for _ in range(repeats):
                noise = _randn(latents.shape[1:], generators, latents.device, latents.dtype)
                t_batch = torch.full((latents.shape[0],), int(t), device=latents.device, dtype=torch.long)
                z_t = scheduler.add_noise(latents, noise, t_batch)
                unet(z_t, t_batch, encoder_hidden_states=text_embeddings)
        return acc.mean()
