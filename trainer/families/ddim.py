"""One DDIM step with the log-probability of its result: the policy of DDPO.

The same function serves sampling (draws x_{t-1}) and training (re-scores a stored x_{t-1}), so the
importance ratio is exactly 1 before the first update.
"""

from __future__ import annotations

import math

import torch

SIGMA_MIN = 1e-6  # eta = 0 makes sigma 0; the density needs a floor (as the JAX original)


def _broadcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A scalar or per-sample tensor shaped to broadcast against ``like``."""
    return values.reshape(-1, *([1] * (like.ndim - 1))) if values.ndim else values


def ddim_mean_std(
    scheduler, model_output: torch.Tensor, timestep: torch.Tensor | int, sample: torch.Tensor, eta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of p(x_{t-1} | x_t), in float32 (sigma unclamped: 0 when eta is 0)."""
    config = scheduler.config
    model_output, sample = model_output.float(), sample.float()
    # a 1-element index, not a 0-d one: indexing with a 0-d tensor reads it on the host, a sync per sampling
    # step on a GPU (sampling passes one timestep for the batch)
    t = torch.as_tensor(timestep, device=sample.device).long().reshape(-1)
    t_prev = t - config.num_train_timesteps // scheduler.num_inference_steps

    # no-ops once the schedule lives on the device (SD1.timesteps puts it there): no copy or sync per step
    alphas = scheduler.alphas_cumprod.to(sample.device, torch.float32)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, device=sample.device, dtype=torch.float32)
    a_t = _broadcast(alphas[t], sample)
    a_prev = _broadcast(torch.where(t_prev >= 0, alphas[t_prev.clamp(min=0)], final), sample)
    x0, eps = _x0_eps(config.prediction_type, a_t, model_output, sample)

    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    sigma = eta * variance.clamp(min=0).sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
    return mean, sigma


def ddim_x0(scheduler, model_output: torch.Tensor, timestep: torch.Tensor | int, sample: torch.Tensor) -> torch.Tensor:
    """The predicted clean latents of x_t, float32 (differentiable: ReFL's reward is taken on them)."""
    # a 1-element index, not a 0-d one: indexing with a 0-d tensor reads it on the host (a sync on a GPU)
    t = torch.as_tensor(timestep, device=sample.device).long().reshape(-1)
    a_t = _broadcast(scheduler.alphas_cumprod.to(sample.device, torch.float32)[t], sample)
    return _x0_eps(scheduler.config.prediction_type, a_t, model_output.float(), sample.float())[0]


def _x0_eps(prediction_type: str, a_t: torch.Tensor, model_output: torch.Tensor, sample: torch.Tensor):
    if prediction_type == "epsilon":
        return (sample - (1 - a_t).sqrt() * model_output) / a_t.sqrt(), model_output
    if prediction_type == "v_prediction":
        return a_t.sqrt() * sample - (1 - a_t).sqrt() * model_output, a_t.sqrt() * model_output + (
            1 - a_t
        ).sqrt() * sample
    raise ValueError(f"prediction_type {prediction_type!r} is not supported")


def check_scheduler(scheduler, num_steps: int) -> None:
    """Fail unless ``ddim_mean_std`` models this scheduler: it takes the previous timestep to be
    ``t - num_train_timesteps // num_steps`` (as diffusers' DDIMScheduler.step does) and never clips or
    thresholds the predicted x0."""
    config = scheduler.config
    for name in ("clip_sample", "thresholding"):
        if config.get(name, False):
            raise ValueError(
                f"pretrained.model: its scheduler sets {name} true; the DDIM log-prob step does not clip the "
                f'predicted x0, so its log-probs would not be those of the samples: set "{name}": false in the '
                "model's scheduler/scheduler_config.json"
            )
    scheduler.set_timesteps(num_steps)
    stride = config.num_train_timesteps // num_steps
    gaps = (scheduler.timesteps[:-1] - scheduler.timesteps[1:]).tolist()
    if any(gap != stride for gap in gaps):
        raise ValueError(
            f"pretrained.model: its scheduler's timestep_spacing {config.get('timestep_spacing')!r} gives "
            f"{num_steps} steps (sample.num_steps) {sorted(set(gaps))} apart; the DDIM log-prob step needs them "
            f'num_train_timesteps // sample.num_steps = {stride} apart: use timestep_spacing "leading" or a '
            "sample.num_steps that divides num_train_timesteps"
        )


def zero_std_steps(scheduler, num_steps: int, eta: float, steps) -> list[int]:
    """Which of ``steps`` (indices into a ``num_steps`` schedule) have std 0 at ``eta``: the last one when
    the schedule ends on alpha 1 (``set_alpha_to_one``), every one at eta 0."""
    scheduler.set_timesteps(num_steps)
    zero = torch.zeros(1, 1)
    return [i for i in steps if float(ddim_mean_std(scheduler, zero, scheduler.timesteps[i], zero, eta)[1]) == 0]


def ddim_step_with_logprob(
    scheduler,
    model_output: torch.Tensor,
    timestep: torch.Tensor | int,
    sample: torch.Tensor,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (x_{t-1}, log p(x_{t-1} | x_t)), the log-prob averaged over all but the batch dimension.

    ``timestep`` is a scalar or one timestep per sample; ``scheduler`` is a diffusers DDIMScheduler on which
    ``set_timesteps`` has been called. Works in float32 whatever the model's dtype.
    """
    mean, sigma = ddim_mean_std(scheduler, model_output, timestep, sample, eta)
    if prev_sample is None:
        noise = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
        prev_sample = mean + sigma * noise
    prev_sample = prev_sample.float()
    return prev_sample, gaussian_log_prob(prev_sample, mean, sigma)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, sigma^2) averaged over all but the batch dimension, sigma floored at SIGMA_MIN."""
    std = sigma.clamp(min=SIGMA_MIN)
    log_prob = -((x.float() - mean) ** 2) / (2 * std**2) - std.log() - math.log(math.sqrt(2 * math.pi))
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
