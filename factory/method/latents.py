"""Noise and the VAE: the method's way into and out of latent space.

    z0 = encode_images(vae, images, generators)    # (B, 3, H, W) in [-1, 1] -> scaled latents
    images = decode_latents(vae, z0)                # -> (B, H, W, 3) uint8
    noise = randn(z0.shape[1:], generators, z0.device, z0.dtype)

Every draw comes from one `torch.Generator` per sample, so a sample's noise depends on its seed alone. The VAE
runs one sample at a time on the CPU (CPU kernels are not bitwise batch-invariant) and `VAE_CHUNK` at a time
on a GPU (bounded activations).
"""

from __future__ import annotations

import numpy as np
import torch


def randn(shape, generators: list[torch.Generator], device, dtype) -> torch.Tensor:
    """(B, *shape) standard normal noise, sample i drawn from generators[i] (in fp32 on the CPU, so that a
    sample's noise depends on its seed alone, not on its batch, device or dtype)."""
    return torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators]).to(
        device, dtype
    )


def latent_shift(vae) -> float:
    """The VAE's latent shift: SD3's VAE has one (latents are (z - shift) * scaling), SD's and SDXL's none."""
    return getattr(vae.config, "shift_factor", None) or 0.0


VAE_CHUNK = 4  # samples per VAE call on a GPU (1 on the CPU): the VAE's activations grow with pixels


def vae_chunks(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A batch split into the pieces the VAE encodes or decodes at once: one sample on the CPU (CPU kernels
    are not bitwise batch-invariant, and a sample must not depend on its batch), `VAE_CHUNK` on a GPU (an
    SDXL decode at 1024 px holds gigabytes of activations per image; diffusers' "VAE slicing" does one)."""
    if x.device.type == "cpu":
        return tuple(xi[None] for xi in x)  # (not x.split(1): its strides change a CPU conv's last bits)
    return x.split(VAE_CHUNK)


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """images (B, 3, H, W) in [-1, 1] -> scaled latents, sampled from the posterior (as the paper's code).

    The latents are (z - shift_factor) * scaling_factor, as diffusers' pipelines scale them (SD3's VAE has a
    shift; SD's and SDXL's have none)."""
    # On the CPU one sample at a time, so that a sample's latents do not depend on its batch (see
    # decode_latents); on a GPU `VAE_CHUNK` samples at a time, so that the VAE's activations stay bounded.
    x = images.to(vae.device, vae.dtype)
    dists = [vae.encode(xi).latent_dist for xi in vae_chunks(x)]
    mean = torch.cat([d.mean for d in dists])
    std = torch.cat([d.std for d in dists])
    eps = randn(mean.shape[1:], generators, mean.device, mean.dtype)
    return (mean + std * eps - latent_shift(vae)) * vae.config.scaling_factor


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def decode_latents(vae, z: torch.Tensor) -> np.ndarray:
    """Scaled latents (B, C, h, w) -> images (B, H, W, 3) uint8, in `vae_chunks` (one sample at a time on the
    CPU: a sample must not depend on the batch it lands in; a few on a GPU, where results may differ in the
    last bits between batch sizes, as for the UNet)."""
    shift = latent_shift(vae)
    pieces = vae_chunks(z.to(vae.dtype))
    return np.concatenate(
        [to_uint8(vae.decode(zi / vae.config.scaling_factor + shift).sample) for zi in pieces]
    )


class PatchNormedVAE(torch.nn.Module):
    """FLUX.2's VAE (`AutoencoderKLFlux2`) as the method reads it: its latents normalized by the VAE's own
    batch-norm statistics, which `Flux2Pipeline` applies over 2 x 2 patches of latent cells (128 channels
    for FLUX.2's 32). The method keeps latents as (C, h, w) cells, as for FLUX.1 (`FluxDenoiser` packs the
    patches), so the statistics are applied here per channel and position in the patch: the same numbers as
    the pipeline's `(patchify(z) - mean) / std`, laid out as cells. `encode` and `decode` speak that
    normalized space; `config` says scaling 1 and no shift, so `encode_images` and `decode_latents` take it
    as any VAE."""

    def __init__(self, vae):
        from types import SimpleNamespace

        super().__init__()
        self.vae = vae
        self.config = SimpleNamespace(
            scaling_factor=1.0,
            shift_factor=0.0,
            block_out_channels=vae.config.block_out_channels,
            force_upcast=getattr(vae.config, "force_upcast", False),
        )

    @property
    def device(self) -> torch.device:
        return self.vae.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    def _stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch-norm mean and std laid out over (C, 2, 2) patch positions, as `z`'s cells see them."""
        bn, c = self.vae.bn, z.shape[1]
        std = torch.sqrt(bn.running_var + self.vae.config.batch_norm_eps)
        shape = (1, c, 1, 2, 1, 2)
        return bn.running_mean.view(shape).to(z), std.view(shape).to(z)

    def normalize(self, z: torch.Tensor, shift: bool = True) -> torch.Tensor:
        """Raw VAE latents (B, C, h, w) -> the normalized cells; `shift=False` scales only (a std)."""
        b, c, h, w = z.shape
        mean, std = self._stats(z)
        cells = z.view(b, c, h // 2, 2, w // 2, 2)
        return ((cells - mean if shift else cells) / std).view(b, c, h, w)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        b, c, h, w = z.shape
        mean, std = self._stats(z)
        return (z.view(b, c, h // 2, 2, w // 2, 2) * std + mean).view(b, c, h, w)

    def encode(self, x: torch.Tensor):
        from types import SimpleNamespace

        dist = self.vae.encode(x).latent_dist
        mean, std = self.normalize(dist.mean), self.normalize(dist.std, shift=False)
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, std=std, mode=lambda: mean))

    def decode(self, z: torch.Tensor):
        return self.vae.decode(self.denormalize(z))
