"""The samplers of synthesis (Step 5) and background inpainting (Step 4): diffusers schedulers by name.

    scheduler = make_scheduler("dpm++", pipe.scheduler.config)   # from the model's own schedule
    z = scheduler.step(eps, t, z, **step_kwargs(scheduler)).prev_sample

| name | diffusers class | notes |
|---|---|---|
| `ddim` | DDIMScheduler, eta 0 | the paper's sampler, and the default |
| `dpm++` | DPMSolverMultistepScheduler (`dpmsolver++`, 2nd order) | 15-20 steps where DDIM needs 50 |
| `unipc` | UniPCMultistepScheduler | competitive at 10 steps |
| `euler` | EulerDiscreteScheduler | the k-diffusion Euler sampler |

Every scheduler is built from the model's scheduler config, so the noise schedule (betas, prediction type,
timestep spacing) stays the model's: an SD 2.x v-prediction model samples, is probed and inpaints with v.
The attention probe of real images (Step 1) always uses the DDIM grid of the paper
(`factory.method.probe.probe_timesteps`), whatever sampler synthesis uses.

Rectified-flow models (SD3, whose scheduler is a `FlowMatchEulerDiscreteScheduler`) take `ddim` (the
default) and `euler`, and both are its flow-matching Euler sampler: DDIM with eta 0 is the Euler step of the
probability-flow ODE, which for a rectified flow is exactly that scheduler's step. The probe's grid is the
same scheduler's, and `add_noise` noises by the flow's straight path.
"""

from __future__ import annotations

from factory.registry import Registry

# name -> (diffusers class, overrides of the model's scheduler config). A new sampler is one registration
# here; the job config's `sampler.scheduler` and `inpaint.scheduler` choices follow.
SCHEDULERS: Registry[tuple[str, dict]] = Registry("scheduler")
SCHEDULERS.register("ddim", ("DDIMScheduler", {}))
SCHEDULERS.register(
    "dpm++", ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2})
)
SCHEDULERS.register("unipc", ("UniPCMultistepScheduler", {}))
SCHEDULERS.register("euler", ("EulerDiscreteScheduler", {}))
SchedulerName = SCHEDULERS.literal()  # a config field's type: one of the registered samplers


FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"
FLOW_SCHEDULERS = ("ddim", "euler")  # the names a rectified-flow model takes: both are its Euler sampler


def is_flow(config) -> bool:
    """Whether a scheduler, or a scheduler config, is a rectified flow's (SD3)."""
    if hasattr(config, "config"):  # a scheduler
        return type(config).__name__ == FLOW_SCHEDULER
    return config.get("_class_name") == FLOW_SCHEDULER


def make_scheduler(name: str, config):
    """A fresh scheduler `name` (see SCHEDULERS) on the noise schedule of `config`: the model's own scheduler
    or its config."""
    import diffusers

    cls, overrides = SCHEDULERS[name]
    if is_flow(config):
        if name not in FLOW_SCHEDULERS:
            raise ValueError(
                f"scheduler {name!r} is not served for a rectified-flow model (SD3); choose one of "
                f"{', '.join(FLOW_SCHEDULERS)} (both are its flow-matching Euler sampler)"
            )
        return diffusers.FlowMatchEulerDiscreteScheduler.from_config(getattr(config, "config", config))
    config = getattr(config, "config", config)
    return getattr(diffusers, cls).from_config(config, **overrides)


def add_noise(scheduler, x0, noise, t):
    """x0 noised to timestep(s) t: the DDPM forward process of `scheduler`, or a rectified flow's straight
    path (1 - sigma) x0 + sigma noise, sigma = t / num_train_timesteps (SD3's timesteps are sigma * 1000)."""
    if is_flow(scheduler):
        sigma = (t.float() / scheduler.config.num_train_timesteps).to(x0.device, x0.dtype)
        sigma = sigma.reshape(-1, *([1] * (x0.ndim - 1)))
        return (1 - sigma) * x0 + sigma * noise
    return scheduler.add_noise(x0, noise, t)


def scale_model_input(scheduler, x, t):
    """The scheduler's input scaling (Euler's), or x itself where it has none (DDIM, flow matching)."""
    return scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x


def init_noise_sigma(scheduler) -> float:
    """The standard deviation of the first latents: 1 but for the Euler-type samplers of DDPM models."""
    return getattr(scheduler, "init_noise_sigma", 1.0)


def step_kwargs(scheduler) -> dict:
    """The keyword arguments of `scheduler.step` that make it deterministic (DDIM: eta = 0)."""
    return {"eta": 0.0} if type(scheduler).__name__ == "DDIMScheduler" else {}
