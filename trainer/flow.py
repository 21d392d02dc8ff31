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

``flow_cps_mean_std`` is the "coefficients-preserving" variant Flow-GRPO added for its Fast / no-CFG runs
(Wang and Yu 2025, "Coefficients-Preserving Sampling for Reinforcement Learning with Flow Matching"): from the
predicted clean image x0 = x - s v and noise x1 = x + (1 - s) v,

    std  = s_next sin(noise_level pi / 2)
    mean = x0 (1 - s_next) + x1 sqrt(s_next^2 - std^2)

so x_next keeps the noise share s_next of the marginal at the next sigma; noise level 0 is again Euler.
"""

from __future__ import annotations

import math

import torch

NOISE_LEVEL = 0.7  # Flow-GRPO's default


def _sigmas_at(sigmas: torch.Tensor, index, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sigmas[index] and sigmas[index + 1], shaped to broadcast against ``sample`` (index: scalar or per sample)."""
    sigmas = sigmas.to(sample.device, torch.float32)
    index = torch.as_tensor(index, device=sample.device).long()
    shape = (-1, *([1] * (sample.ndim - 1))) if index.ndim else ()
    return sigmas[index].reshape(shape), sigmas[index + 1].reshape(shape)


def flow_sde_mean_std(sigmas: torch.Tensor, index: torch.Tensor | int, velocity: torch.Tensor, sample: torch.Tensor,
                      noise_level: float = NOISE_LEVEL) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of p(x_next | x) at step ``index`` (a scalar or one per sample), in float32."""
    velocity, sample = velocity.float(), sample.float()
    s, s_next = _sigmas_at(sigmas, index, sample)
    dt = s_next - s
    s_prime = torch.where(s == 1, sigmas[1].to(s), s)
    std_t = noise_level * torch.sqrt(s / (1 - s_prime))
    mean = sample * (1 + std_t**2 / (2 * s) * dt) + velocity * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
    return mean, std_t * torch.sqrt(-dt)


def flow_cps_mean_std(sigmas: torch.Tensor, index: torch.Tensor | int, velocity: torch.Tensor, sample: torch.Tensor,
                      noise_level: float = NOISE_LEVEL) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the coefficients-preserving step at ``index``, in float32."""
    velocity, sample = velocity.float(), sample.float()
    s, s_next = _sigmas_at(sigmas, index, sample)
    std = s_next * math.sin(noise_level * math.pi / 2)
    x0, x1 = sample - s * velocity, sample + (1 - s) * velocity
    return x0 * (1 - s_next) + x1 * torch.sqrt((s_next**2 - std**2).clamp(min=0)), std.expand_as(s_next)


FLOW_STEPS = {"sde": flow_sde_mean_std, "cps": flow_cps_mean_std}
