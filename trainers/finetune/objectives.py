"""What the denoiser learns in fine-tuning (paper Step 3), per kind of model: the noised input, the target
and the timesteps drawn.

    objective = training_objective(family, resolution)
    t = objective.sample_t(n, device)          # the training timesteps (the denoiser's own scale, 0..1000)
    z_t = objective.noisy(z0, noise, t)
    loss = masked_mse(denoiser(z_t, t, cond), objective.target(z0, noise, t), mask)

- `DiffusionObjective` (SD 1.x / 2.x, SDXL, toyworld): the model's DDPM training schedule, t ~ U{0..T-1},
  z_t = sqrt(a) z0 + sqrt(1 - a) eps; the target is the noise, or v for a v-prediction model, as the paper.
- `FlowObjective` (SD3, FLUX.1, FLUX.2, Z-Image: rectified flow): z_t = (1 - sigma) z0 + sigma eps, the
  target the velocity eps - z0, sigma drawn as diffusers' SD3 and FLUX DreamBooth scripts draw it: u from a
  logit-normal (mean 0, std 1), sigma the scheduler's shifted sigma at index u * T. The shift is the one the
  method samples with at `resolution` (`family.schedule_config`: SD3's fixed 3.0; FLUX's resolution-
  dependent one, where diffusers' FLUX script trains on the unshifted grid), no loss weighting (their
  default "none" for logit-normal sampling). The timestep handed to the denoiser is 1000 sigma, what the
  family's denoiser takes (`families.FluxDenoiser` divides it back).
"""

from __future__ import annotations

import torch

from factory.method.schedulers import add_noise, is_flow


class _Objective:
    scheduler = None  # the model's training schedule: a DDPMScheduler, or the flow's shifted scheduler

    def noisy(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """z0 noised to t: the DDPM forward process, or the flow's straight path (`schedulers.add_noise`)."""
        return add_noise(self.scheduler, z0, noise, t)


class DiffusionObjective(_Objective):
    """Epsilon or v-prediction on the model's DDPM schedule (`noise_scheduler`, a DDPMScheduler)."""

    def __init__(self, noise_scheduler):
        kind = noise_scheduler.config.prediction_type
        if kind not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"fine-tuning does not serve prediction_type {kind!r}; epsilon and v_prediction are"
            )
        self.scheduler = noise_scheduler

    def sample_t(self, n: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(0, self.scheduler.config.num_train_timesteps, (n,), generator=generator).to(
            device
        )

    def target(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noise (epsilon models), or v = sqrt(a) eps - sqrt(1 - a) z0 for a v-prediction model."""
        if self.scheduler.config.prediction_type == "epsilon":
            return noise
        return self.scheduler.get_velocity(z0, noise, t)


class FlowObjective(_Objective):
    """Rectified flow: the velocity eps - z0 at logit-normal sigmas of the shifted schedule.

    Args:
        config: the flow scheduler's config as the method samples with it (a fixed `shift`).
    """

    def __init__(self, config: dict):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
            {**config, "use_dynamic_shifting": False}
        )
        self.sigmas = self.scheduler.sigmas.flip(0).float()  # the T shifted training sigmas, ascending
        self.num_train_timesteps = self.scheduler.config.num_train_timesteps

    def sample_t(self, n: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        u = torch.sigmoid(torch.randn(n, generator=generator))  # logit-normal(0, 1)
        index = (u * len(self.sigmas)).long().clamp(max=len(self.sigmas) - 1)
        return (self.sigmas[index] * self.num_train_timesteps).to(device)

    def target(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise - z0


SHIFT_STEPS = 50  # the sampling steps FLUX.2's shift is computed for in training: its pipelines' default


def training_objective(family, resolution: int) -> DiffusionObjective | FlowObjective:
    """The objective of the family's model: flow matching where its scheduler is a flow-matching one (at
    the shift the family samples `resolution` with; FLUX.2's also depends on the step count, taken as its
    pipelines' default 50), else the DDPM schedule of its scheduler's config."""
    from diffusers import DDPMScheduler

    scheduler = family.pipe.scheduler
    if is_flow(scheduler):
        return FlowObjective(family.schedule_config(scheduler, resolution, SHIFT_STEPS))
    return DiffusionObjective(DDPMScheduler.from_config(scheduler.config))
