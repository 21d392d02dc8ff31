"""The DDIM dynamics (Song et al. 2021, "Denoising Diffusion Implicit Models"): one stochastic DDIM step with the
log-probability of its result, the policy of DDPO (Black et al. 2023, github.com/kvablack/ddpo-pytorch), and the
forward process the other objectives train on.

``DDIM`` is what a UNet family (trainer/families/sd1.py, sdxl.py) composes as its ``dynamics``: it holds the
pipeline's DDIMScheduler and nothing of the model. The same ``ddim_mean_std`` serves sampling (draws x_{t-1}) and
training (re-scores a stored x_{t-1}), so the importance ratio is exactly 1 before the first update.
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


def gaussian_kl(mean: torch.Tensor, reference_mean: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL between two Gaussians of equal sigma, averaged like the log-probs (per sample)."""
    kl = (mean - reference_mean) ** 2 / (2 * sigma.clamp(min=SIGMA_MIN) ** 2)
    return kl.mean(dim=tuple(range(1, kl.ndim)))


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, sigma^2) averaged over all but the batch dimension, sigma floored at SIGMA_MIN."""
    std = sigma.clamp(min=SIGMA_MIN)
    log_prob = -((x.float() - mean) ** 2) / (2 * std**2) - std.log() - math.log(math.sqrt(2 * math.pi))
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


class DDIM:
    """The sampler's dynamics on a DDIMScheduler, indexed by step of the schedule ``timesteps`` last set: x_T, the
    Gaussian p(x_{t-1} | x_t) with its log-prob and KL, the x0 a prediction implies, and the forward process
    q(x_t | x0) x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps at training or sampler timesteps."""

    def __init__(self, scheduler):
        self.scheduler = scheduler  # the pipeline's own (the pipeline samples with the same schedule)

    def timesteps(self, num_steps: int, device) -> torch.Tensor:
        scheduler = self.scheduler
        scheduler.set_timesteps(num_steps, device=device)
        # the step's constants on the device once, not copied from the host at every step
        scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)
        scheduler.final_alpha_cumprod = torch.as_tensor(scheduler.final_alpha_cumprod).to(device)
        return scheduler.timesteps

    def prior(self, shape: tuple[int, ...], generator, device) -> torch.Tensor:
        """x_T ~ N(0, init_noise_sigma^2 I) in float32, as StableDiffusionPipeline.prepare_latents draws it."""
        noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        return noise * self.scheduler.init_noise_sigma

    def step(self, output: torch.Tensor, index: torch.Tensor | int, latents: torch.Tensor, eta: float):
        """Mean and std of p(x_{t-1} | x_t) at step ``index`` of the schedule (float32)."""
        scheduler = self.scheduler
        return ddim_mean_std(scheduler, output, scheduler.timesteps.to(latents.device)[index], latents, eta)

    @staticmethod
    def log_prob(x_next: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """log N(x_next; mean, std^2) averaged over C, H, W, as ddpo-pytorch."""
        return gaussian_log_prob(x_next, mean, std)

    @staticmethod
    def kl(mean: torch.Tensor, reference_mean: torch.Tensor, std: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The exact KL between the DDIM step's Gaussians under the policy and the reference (same std),
        averaged like the log-prob. ddpo-pytorch has no KL term; this is Flow-GRPO's penalty with the DDIM
        step's own std (a DDIM step has no dt to leave out)."""
        return gaussian_kl(mean, reference_mean, std)

    def predicted_x0(self, output: torch.Tensor, index: torch.Tensor | int, latents: torch.Tensor) -> torch.Tensor:
        """The clean latents the prediction at step ``index`` implies (float32, differentiable)."""
        scheduler = self.scheduler
        return ddim_x0(scheduler, output, scheduler.timesteps.to(latents.device)[index], latents)

    def noised(self, latents: torch.Tensor, noise: torch.Tensor, u: torch.Tensor):
        """The forward process at training timesteps drawn as ``u`` in [0, 1) (one per sample, uniform over
        the scheduler's training timesteps): the noisy latents, the timesteps and the model's regression
        target (the noise, or the velocity for a v-prediction model)."""
        scheduler = self.scheduler
        t = (u * scheduler.config.num_train_timesteps).long().clamp(max=scheduler.config.num_train_timesteps - 1)
        noisy = scheduler.add_noise(latents, noise, t)
        if scheduler.config.prediction_type == "v_prediction":
            return noisy, t, scheduler.get_velocity(latents, noise, t)
        return noisy, t, noise

    def noised_at(self, latents: torch.Tensor, noise: torch.Tensor, index: torch.Tensor):
        """The forward process at step ``index`` of the sampler's schedule (one per sample; DiffusionNFT and
        AWM train at the sampler's own steps): x_t, the denoiser's timesteps, the regression target (the noise,
        or the velocity for a v-prediction model) and the time in [0, 1] (t / num_train_timesteps)."""
        scheduler = self.scheduler
        t = scheduler.timesteps.to(latents.device)[index]
        target = (
            scheduler.get_velocity(latents, noise, t) if scheduler.config.prediction_type == "v_prediction" else noise
        )
        return scheduler.add_noise(latents, noise, t), t, target, t.float() / scheduler.config.num_train_timesteps
