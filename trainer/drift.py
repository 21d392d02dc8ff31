"""What reward finetuning does to the model beyond the reward, measured at each evaluation on the policy's own
samples (NormGuard, arXiv 2606.27771: RL post-training inflates the velocity's norm 5-15% over the base
model's on the same inputs, and the samples drift where the base model no longer denoises them well).

Each evaluation image's final latent x0 is noised once, at one of three fixed noise levels with noise seeded by
the image's own seed (so the numbers do not depend on batching or the number of processes), and both the
policy and the base model (LoRA's adapters off, or the full finetune's frozen copy) predict on it:

- ``norm_ratio``: rms(prediction of the policy) / rms(prediction of the base), per image (1 at the start);
- ``base_loss``: the base model's denoising MSE on the policy's samples (rises as they leave the base's
  distribution: reward hacking, or a collapse onto a few layouts);
- ``policy_loss``: the policy's own.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import numpy as np
import torch

from trainer.loss import rms

LEVELS = (0.25, 0.5, 0.75)  # u in [0, 1), mapped by the family's dynamics to its timesteps (and shift)
NAMES = ("norm_ratio", "base_loss", "policy_loss")


class Drift:
    """Called by trainer.evaluate.evaluate on each batch it samples; holds the per-image values."""

    def __init__(self, family, policy, base: Callable[[], contextlib.AbstractContextManager], autocast):
        self.family, self.policy, self.base, self.autocast = family, policy, base, autocast
        self.values: dict[str, list[float]] = {name: [] for name in NAMES}

    @torch.no_grad()
    def __call__(self, x0: torch.Tensor, cond, seeds: list[int]) -> None:
        device = x0.device
        x0 = x0.float()
        noise = torch.cat(
            [
                torch.randn(x0[:1].shape, generator=torch.Generator(device).manual_seed(s + (1 << 30)), device=device)
                for s in seeds
            ]
        )
        u = torch.tensor([LEVELS[s % len(LEVELS)] for s in seeds], device=device)
        noisy, timesteps, target = self.family.dynamics.noised(x0, noise, u)

        def predict(model) -> torch.Tensor:
            with self.autocast():
                return self.family.predict(model, noisy, timesteps, cond, None, 1.0).float()

        policy = predict(self.policy)
        with self.base() as base:
            reference = predict(base)
        dims = tuple(range(1, target.ndim))
        for name, value in {
            "norm_ratio": rms(policy) / rms(reference).clamp(min=1e-12),
            "base_loss": ((reference - target) ** 2).mean(dim=dims),
            "policy_loss": ((policy - target) ** 2).mean(dim=dims),
        }.items():
            self.values[name] += value.cpu().tolist()


def summary(values: dict[str, np.ndarray], categories: np.ndarray | None) -> dict[str, float]:
    """The means under ``drift/``, and per category (``category/<c>/drift_<name>``) when the scorer tells them."""
    out = {f"drift/{name}": float(np.mean(v)) for name, v in values.items()}
    if categories is not None:
        for c in sorted(set(categories)):
            out |= {f"category/{c}/drift_{name}": float(np.mean(v[categories == c])) for name, v in values.items()}
    return out
