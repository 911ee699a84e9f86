"""Paper Step 4: background inpainting of the preliminary-mask region (Eq. 6, LDM-style latent blending).

With a standard 4-channel text-to-image UNet, each sampler step first blends ("blend, then step"):

    z = keep * add_noise(z0, fresh_noise, t) + (1 - keep) * z
    eps = unet(z, t, emb(background prompt))
    z = scheduler.step(eps, t, z)          # DDIM (eta 0, the paper's) or another `schedulers` entry

where keep = 1 - M_pre (the region to keep). No final paste-back: the decoded image is the model's
rendering of the whole canvas, as in the paper's code. This differs slightly from diffusers' former
`StableDiffusionInpaintPipelineLegacy`, which blended after the step at the next timestep.

Optional concept-distillation guidance mixes the background and object predictions:
    eps = eps_b + s * (eps_f - eps_b)
s = 0 (default) is the plain background prompt; s < 0 pushes away from the object (object-free
backgrounds). If the user's model is a 9-channel inpainting UNet, it is used as such: its input is
[z, region mask, masked-image latents] and no blending is needed.
"""

from __future__ import annotations

import torch

from factory.method.families import Conditioning, as_conditioning, as_denoiser
from factory.method.latents import randn
from factory.method.schedulers import add_noise, init_noise_sigma, scale_model_input, step_kwargs


@torch.no_grad()
def inpaint_background(
    denoiser,
    scheduler,
    z0: torch.Tensor,
    region: torch.Tensor,
    bg_emb: Conditioning | torch.Tensor,
    generators: list[torch.Generator],
    num_inference_steps: int = 50,
    fg_emb: Conditioning | torch.Tensor | None = None,
    object_guidance: float = 0.0,
    masked_image_latents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inpaint `region` (B, 1, h, w; 1 = repaint) of the latents z0 with the background prompt.

    denoiser: a `factory.method.families` denoiser, or a bare UNet (SD-style text embeddings).
    Returns the final latents (B, C, h, w); decode them with the VAE.
    """
    if region.shape[0] != z0.shape[0] or region.shape[-2:] != z0.shape[-2:]:
        raise ValueError(f"region {tuple(region.shape)} does not match latents {tuple(z0.shape)}")
    if object_guidance != 0.0 and fg_emb is None:
        raise ValueError("object_guidance needs the object prompt's embeddings (fg_emb)")
    denoiser, bg_emb = as_denoiser(denoiser), as_conditioning(bg_emb)
    nine_channel = denoiser.in_channels == 9
    if nine_channel and masked_image_latents is None:
        raise ValueError("a 9-channel inpainting UNet needs masked_image_latents")
    region = region.to(z0.dtype)
    keep = 1.0 - region
    scheduler.set_timesteps(num_inference_steps)
    kwargs = step_kwargs(scheduler)
    z = randn(z0.shape[1:], generators, z0.device, z0.dtype) * init_noise_sigma(scheduler)
    for t in scheduler.timesteps:
        if nine_channel:
            model_in = torch.cat([z, region, masked_image_latents], 1)
        else:
            noised = add_noise(
                scheduler, z0, randn(z0.shape[1:], generators, z0.device, z0.dtype), t.reshape(1)
            )
            z = keep * noised + region * z
            model_in = z
        model_in = scale_model_input(scheduler, model_in, t)
        if object_guidance != 0.0:
            both = Conditioning.cat([bg_emb, as_conditioning(fg_emb)])
            eps_b, eps_f = denoiser(torch.cat([model_in, model_in]), t, both).chunk(2)
            eps = eps_b + object_guidance * (eps_f - eps_b)
        else:
            eps = denoiser(model_in, t, bg_emb)
        z = scheduler.step(eps, t, z, **kwargs).prev_sample
    return z
