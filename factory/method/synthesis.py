"""Paper Step 5: text-to-image generation of a concept, recording its attention in the same loop.

A plain sampling loop: DDIM with eta = 0 as the paper (or another `factory.method.schedulers` entry) on the
model's noise schedule. During the T0 least-noisy steps of its grid (for DDIM, the same steps the Step-1
probe uses) the concept tokens' cross-attention of the conditional branch is accumulated, so the
generated image's mean attention map comes without a second probe pass. With guidance_scale != 1 the UNet
batch is [negative, conditional] and only the conditional rows are recorded. The paper samples with
scale 1 and uses the background prompt as the "unconditional" branch when guiding.
"""

from __future__ import annotations

import torch

from factory.method.families import Conditioning, as_conditioning, as_denoiser
from factory.method.latents import randn
from factory.method.readouts import Readout
from factory.method.schedulers import init_noise_sigma, scale_model_input, step_kwargs


@torch.no_grad()
def synthesize_latents(
    denoiser,
    scheduler,
    shape: tuple[int, int, int],
    cond_emb: Conditioning | torch.Tensor,
    token_weights: torch.Tensor,
    generators: list[torch.Generator],
    num_inference_steps: int = 50,
    guidance_scale: float = 1.0,
    negative_emb: Conditioning | torch.Tensor | None = None,
    capture_t0: int = 40,
    capture: bool = True,
    readout: Readout | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns (latents (B, C, h, w), mean attention (B, h, w) or None).

    denoiser: a `factory.method.families` denoiser, or a bare UNet (SD-style text embeddings).
    readout: the concept map's readout (`factory.method.readouts`); default: `image_to_text`, every layer."""
    denoiser, cond_emb = as_denoiser(denoiser), as_conditioning(cond_emb)
    b = cond_emb.hidden.shape[0]
    guided = guidance_scale != 1.0
    if guided and negative_emb is None:
        raise ValueError("guidance_scale != 1 needs negative_emb (the empty or background prompt)")
    scheduler.set_timesteps(num_inference_steps)
    timesteps = scheduler.timesteps
    first_recorded = len(timesteps) - capture_t0 if capture else len(timesteps)  # the T0 least-noisy steps
    kwargs = step_kwargs(scheduler)
    device, dtype = cond_emb.hidden.device, cond_emb.hidden.dtype
    z = randn(shape, generators, device, dtype) * init_noise_sigma(scheduler)
    emb = Conditioning.cat([as_conditioning(negative_emb), cond_emb]) if guided else cond_emb
    weights = token_weights.to(device)
    if guided:
        weights = torch.cat([torch.zeros_like(weights), weights])
    rows = slice(b, 2 * b) if guided else None
    with denoiser.capture(weights, shape[-1], rows, readout=readout) as acc:
        for i, t in enumerate(timesteps):
            acc.enabled = i >= first_recorded
            model_in = scale_model_input(scheduler, torch.cat([z, z]) if guided else z, t)
            eps = denoiser(model_in, t, emb)  # the model's prediction: eps, v or flow, as its scheduler says
            if guided:
                eps_neg, eps_cond = eps.chunk(2)
                eps = eps_neg + guidance_scale * (eps_cond - eps_neg)
            z = scheduler.step(eps, t, z, **kwargs).prev_sample
        attention = acc.mean() if capture else None
    return z, attention
