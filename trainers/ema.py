"""An exponential moving average of parameters, explicit like diffusers' EMAModel.

The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, as LDM's LitEma does (the paper's
fine-tuning, method.md Step 3, uses decay 0.9999 with this warm-up).
"""

from __future__ import annotations

import torch


class EMA:
    def __init__(self, params, decay: float):
        self.params = list(params)
        self.shadow = [p.detach().clone().float() for p in self.params]
        self.decay = decay
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, params=None) -> None:
        """Move the shadow towards `params` (default: the tracked parameters)."""
        self.updates += 1
        d = self.current_decay()
        src = [p.detach().float() for p in (self.params if params is None else params)]
        torch._foreach_lerp_(self.shadow, src, 1.0 - d)

    @torch.no_grad()
    def copy_to(self, params) -> None:
        for s, p in zip(self.shadow, params, strict=True):
            p.copy_(s.to(p.dtype))

    def state_dict(self) -> dict:
        return {"shadow": self.shadow, "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError("EMA state does not match the model's parameters")
        self.shadow = [s.clone().float() for s in state["shadow"]]
        self.updates = int(state["updates"])
