"""Flow-GRPO's SDE step for flow-matching models (SD3, FLUX): the Gaussian of x_next given x, with its mean
and std, so that sampling and re-scoring share one function (as trainer/ddim.py does for DDIM).

From Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models via Online RL" (github.com/yifan123/flow_grpo).
With the scheduler's sigmas running from 1 down to 0, step i uses s = sigmas[i], s_next = sigmas[i + 1] and
dt = s_next - s < 0; v is the model's velocity:

    std_t = noise_level * sqrt(s / (1 - s'))        s' = s, except s' = sigmas[1] where s == 1
    mean  = x (1 + std_t^2 / (2 s) dt) + v (1 + std_t^2 (1 - s) / (2 s)) dt
    x_next = mean + std_t sqrt(-dt) z

With noise_level 0 the mean is the plain Euler step x + v dt. The log-prob is ddim.gaussian_log_prob of
x_next under (mean, std_t sqrt(-dt)), in float32 (bf16 overflows there).
"""

from __future__ import annotations

import torch

NOISE_LEVEL = 0.7  # Flow-GRPO's default


def flow_sde_mean_std(sigmas: torch.Tensor, index: torch.Tensor | int, velocity: torch.Tensor, sample: torch.Tensor,
                      noise_level: float = NOISE_LEVEL) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of p(x_next | x) at step ``index`` (a scalar or one per sample), in float32."""
    velocity, sample = velocity.float(), sample.float()
    sigmas = sigmas.to(sample.device, torch.float32)
    index = torch.as_tensor(index, device=sample.device).long()
    shape = (-1, *([1] * (sample.ndim - 1))) if index.ndim else ()
    s, s_next = sigmas[index].reshape(shape), sigmas[index + 1].reshape(shape)
    dt = s_next - s
    s_prime = torch.where(s == 1, sigmas[1], s)
    std_t = noise_level * torch.sqrt(s / (1 - s_prime))
    mean = sample * (1 + std_t**2 / (2 * s) * dt) + velocity * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
    return mean, std_t * torch.sqrt(-dt)
