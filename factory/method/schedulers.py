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
timestep spacing) stays the model's. The attention probe of real images (Step 1) always uses the DDIM
grid of the paper (`factory.method.probe.probe_timesteps`), whatever sampler synthesis uses.
"""

from __future__ import annotations

from typing import Literal, get_args

SchedulerName = Literal["ddim", "dpm++", "unipc", "euler"]
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
}
assert tuple(SCHEDULERS) == get_args(SchedulerName)


def make_scheduler(name: str, config):
    """A fresh scheduler `name` (see SCHEDULERS) on the noise schedule of `config` (the model's own)."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    cls, overrides = SCHEDULERS[name]
    return getattr(diffusers, cls).from_config(config, **overrides)


def step_kwargs(scheduler) -> dict:
    """The keyword arguments of `scheduler.step` that make it deterministic (DDIM: eta = 0)."""
    return {"eta": 0.0} if type(scheduler).__name__ == "DDIMScheduler" else {}
