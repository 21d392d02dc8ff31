"""An exponential moving average of the trainable weights; the final weights are the average's."""

from __future__ import annotations

import torch


class EMA:
    def __init__(self, params: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.shadow = {name: p.detach().float().clone() for name, p in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor]) -> None:
        for name, p in params.items():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, params: dict[str, torch.Tensor]) -> None:
        for name, p in params.items():
            p.copy_(self.shadow[name])
