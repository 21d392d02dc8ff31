"""The flow-matching dynamics: Flow-GRPO's SDE step, the Gaussian of x_next given x, with its mean
and std, so that sampling and re-scoring share one function (as trainer/families/ddim.py does for DDIM), and the
rectified-flow forward process. ``FlowMatching`` is what a flow-matching family (trainer/families/sd3.py,
flux.py, flux2.py, qwenimage.py, zimage.py) composes as its ``dynamics``: it holds the pipeline's
FlowMatchEulerDiscreteScheduler, the step's type and, where the schedule shifts by image size (FLUX), the run's
image tokens. The helpers those families share are here too: ``load_flow_pipeline`` (loading with the scheduler
check), ``check_resolution`` (a size-shifted schedule's one resolution) and ``packed_latent_size``.

From Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models via Online RL" (github.com/yifan123/flow_grpo).
With the scheduler's sigmas running from 1 down to 0, step i uses s = sigmas[i], s_next = sigmas[i + 1] and
dt = s_next - s < 0; v is the model's velocity:

    std_t = noise_level * sqrt(s / (1 - s'))        s' = s, except s' = sigmas[1] where s == 1
    mean  = x (1 + std_t^2 / (2 s) dt) + v (1 + std_t^2 (1 - s) / (2 s)) dt
    x_next = mean + std_t sqrt(-dt) z

With noise_level 0 the mean is the plain Euler step x + v dt. The log-prob is ddim.gaussian_log_prob of
x_next under (mean, std_t sqrt(-dt)), in float32 (bf16 overflows there).

Flow-GRPO's KL to the reference model (scripts/train_sd3.py) divides by std_t, not by the transition's std:

    KL = mean((mean - mean_ref)^2) / (2 std_t^2)

which is the exact KL of the two transitions times |dt|. ``flow_grpo_kl`` is that quantity, so that
``train.kl_coef`` is Flow-GRPO's beta (0.04 GenEval and OCR, 0.01 PickScore) and pulls as hard as it does there.

``flow_cps_mean_std`` is the "coefficients-preserving" variant Flow-GRPO added for its Fast / no-CFG runs
(Wang and Yu 2025, "Coefficients-Preserving Sampling for Reinforcement Learning with Flow Matching"): from the
predicted clean image x0 = x - s v and noise x1 = x + (1 - s) v,

    std  = s_next sin(noise_level pi / 2)
    mean = x0 (1 - s_next) + x1 sqrt(s_next^2 - std^2)

so x_next keeps the noise share s_next of the marginal at the next sigma; noise level 0 is again Euler. Its
log-prob in Flow-GRPO drops every constant, -mean((x_next - mean)^2) (``cps_log_prob``), so the PPO log-ratio
is 2 std^2 times the Gaussian one and its clip ranges (1e-5 in the Fast runs) assume that scale; its KL divides
by std, the transition's own. At the last step s_next = 0: the std is 0 and the step cannot be trained (the
configuration refuses it, trainer/config/__init__.py).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from trainer.families.ddim import SIGMA_MIN, gaussian_log_prob
from trainer.families.sd1 import dtype_kwarg

NOISE_LEVEL = 0.7  # Flow-GRPO's default


def _sigmas_at(sigmas: torch.Tensor, index, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sigmas[index] and sigmas[index + 1], shaped to broadcast against ``sample`` (index: scalar or per sample)."""
    sigmas = sigmas.to(sample.device, torch.float32)
    index = torch.as_tensor(index, device=sample.device).long()
    shape = (-1, *([1] * (sample.ndim - 1))) if index.ndim else ()
    return sigmas[index].reshape(shape), sigmas[index + 1].reshape(shape)


def flow_sde_mean_std(
    sigmas: torch.Tensor,
    index: torch.Tensor | int,
    velocity: torch.Tensor,
    sample: torch.Tensor,
    noise_level: float = NOISE_LEVEL,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of p(x_next | x) at step ``index`` (a scalar or one per sample), in float32."""
    velocity, sample = velocity.float(), sample.float()
    s, s_next = _sigmas_at(sigmas, index, sample)
    dt = s_next - s
    s_prime = torch.where(s == 1, sigmas[1].to(s), s)
    std_t = noise_level * torch.sqrt(s / (1 - s_prime))
    mean = sample * (1 + std_t**2 / (2 * s) * dt) + velocity * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
    return mean, std_t * torch.sqrt(-dt)


def flow_cps_mean_std(
    sigmas: torch.Tensor,
    index: torch.Tensor | int,
    velocity: torch.Tensor,
    sample: torch.Tensor,
    noise_level: float = NOISE_LEVEL,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the coefficients-preserving step at ``index``, in float32."""
    velocity, sample = velocity.float(), sample.float()
    s, s_next = _sigmas_at(sigmas, index, sample)
    std = s_next * math.sin(noise_level * math.pi / 2)
    x0, x1 = sample - s * velocity, sample + (1 - s) * velocity
    return x0 * (1 - s_next) + x1 * torch.sqrt((s_next**2 - std**2).clamp(min=0)), std.expand_as(s_next)


def cps_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | None = None) -> torch.Tensor:
    """Flow-GRPO's CPS log-prob: -(x - mean)^2 averaged over all but the batch dimension, every constant
    dropped (``std`` is unused: the step's std is the same under old and new weights)."""
    return -((x.float() - mean) ** 2).mean(dim=tuple(range(1, x.ndim)))


def flow_grpo_kl(
    sigmas: torch.Tensor,
    index: torch.Tensor | int,
    mean: torch.Tensor,
    reference_mean: torch.Tensor,
    std: torch.Tensor,
    sde_type: str,
) -> torch.Tensor:
    """Flow-GRPO's KL penalty per sample: mean((mean - mean_ref)^2) / (2 std_t^2), with std_t the SDE's
    noise_level sqrt(s / (1 - s')), i.e. the transition ``std`` without its sqrt(-dt), and for CPS the
    transition std itself (floored at ddim.SIGMA_MIN like the log-prob)."""
    if sde_type == "sde":
        s, s_next = _sigmas_at(sigmas, index, mean)
        std = std / torch.sqrt(s - s_next)
    squared = ((mean - reference_mean) ** 2).mean(dim=tuple(range(1, mean.ndim)))
    return squared / (2 * std.clamp(min=SIGMA_MIN).reshape(-1) ** 2)


def rectified_flow_noised(latents: torch.Tensor, noise: torch.Tensor, s: torch.Tensor, num_train_timesteps: int):
    """The rectified-flow interpolation x_s = (1 - s) x0 + s noise at times ``s`` (one per sample), the
    transformer's timesteps s x num_train_timesteps and its regression target, the velocity noise - x0."""
    sigma = s.to(latents.dtype).view(-1, *[1] * (latents.ndim - 1))
    return (1 - sigma) * latents + sigma * noise, s * num_train_timesteps, noise - latents


def linear_sigmas(num_steps: int) -> np.ndarray:
    """FluxPipeline's unshifted sigmas: float64 linspace(1, 1 / n, n)."""
    return np.linspace(1.0, 1 / num_steps, num_steps)


def load_flow_pipeline(pipeline_class, path: str, cfg, dtype: torch.dtype, **kwargs):
    """``pipeline_class.from_pretrained`` in ``dtype``, checked to have the FlowMatchEulerDiscreteScheduler whose
    sigmas the SDE step models, its progress bars off (the flow-matching families' sd1.load_with_ddim)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = pipeline_class.from_pretrained(path, revision=cfg.pretrained.revision, **kwargs, **dtype_kwarg(dtype))
    if not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
        raise ValueError(
            f"pretrained.model: the SDE step models FlowMatchEulerDiscreteScheduler's sigmas, "
            f"not a {type(pipe.scheduler).__name__}"
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_resolution(resolution: int, loaded: int, schedule: str) -> None:
    """Refuse ``resolution`` px images where ``schedule`` (e.g. "the FLUX schedule") is shifted by image size and
    was fixed for ``loaded`` px ones when the family loaded."""
    if resolution != loaded:
        raise ValueError(
            f"sample.resolution: {schedule} is shifted for {loaded} px images (set when the model loaded), "
            f"not {resolution}"
        )


def packed_latent_size(vae_scale_factor: int, resolution: int) -> int:
    """Latent rows (= columns) of a ``resolution`` px image, rounded down to even for the 2x2 packing (as the
    pipelines that pack or patchify latents round)."""
    return 2 * (resolution // (vae_scale_factor * 2))


FLOW_STEPS = {"sde": flow_sde_mean_std, "cps": flow_cps_mean_std}
FLOW_LOG_PROBS = {"sde": gaussian_log_prob, "cps": cps_log_prob}


class FlowMatching:
    """The sampler's dynamics on a FlowMatchEulerDiscreteScheduler (sigmas from 1, noise, down to 0), indexed by step
    of the schedule ``timesteps`` last set: x_1, Flow-GRPO's SDE or CPS step (``sde_type``) with its log-prob and
    KL, x0 = x - s v, and the rectified-flow interpolation x_s = (1 - s) x0 + s noise with target noise - x0.

    ``image_tokens``: None for a fixed shift (SD3: the scheduler's own ``set_timesteps``); for a schedule shifted
    by image size (FLUX), the packed tokens of the run's images, fixed when the family loads. ``shift``: where the
    pipeline computes that shift its own way, its function of (image tokens, sampler steps) (FLUX.2's
    ``compute_empirical_mu``); None: FluxPipeline's ``calculate_shift``, which the steps do not change.
    ``sigmas``: with ``image_tokens``, the pipeline's unshifted sigmas for n steps (default FluxPipeline's float64
    ``np.linspace(1, 1 / n, n)``; a pipeline that computes them otherwise passes its own function, since one
    differing last bit in a sigma moves every later step)."""

    def __init__(self, scheduler, sde_type: str = "sde", image_tokens: int | None = None, shift=None, sigmas=None):
        self.scheduler, self.sde_type, self.image_tokens, self.shift = scheduler, sde_type, image_tokens, shift
        self.sigmas = sigmas or linear_sigmas

    def mu(self, image_tokens: int, num_steps: int | None = None) -> float:
        """The schedule's shift for ``image_tokens`` packed tokens and ``num_steps`` sampler steps: ``shift``'s,
        or FluxPipeline's (its calculate_shift)."""
        if self.shift is not None:
            return self.shift(image_tokens, num_steps)
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        c = self.scheduler.config
        return calculate_shift(
            image_tokens,
            c.get("base_image_seq_len", 256),
            c.get("max_image_seq_len", 4096),
            c.get("base_shift", 0.5),
            c.get("max_shift", 1.15),
        )

    def timesteps(self, num_steps: int, device) -> torch.Tensor:
        """The scheduler's schedule; with ``image_tokens``, FluxPipeline's: sigmas linspace(1, 1 / n, n) (or the
        family's ``sigmas``), shifted by mu for the run's image size."""
        if self.image_tokens is None:
            self.scheduler.set_timesteps(num_steps, device=device)
        else:
            sigmas = self.sigmas(num_steps)
            mu = self.mu(self.image_tokens, num_steps)
            self.scheduler.set_timesteps(num_steps, device=device, sigmas=sigmas, mu=mu)
        return self.scheduler.timesteps

    @staticmethod
    def prior(shape: tuple[int, ...], generator, device) -> torch.Tensor:
        """x_1 ~ N(0, I) in float32, as StableDiffusion3Pipeline and FluxPipeline draw it (before FLUX packs it)."""
        return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)

    def step(self, output: torch.Tensor, index: torch.Tensor | int, latents: torch.Tensor, eta: float):
        """Mean and std of p(x_next | x) at step ``index`` of the schedule (Flow-GRPO's SDE or CPS step, float32)."""
        return FLOW_STEPS[self.sde_type](self.scheduler.sigmas, index, output, latents, noise_level=eta)

    def log_prob(self, x_next: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """log p(x_next | x) per sample as Flow-GRPO computes it: the Gaussian's for the SDE step, every
        constant dropped for CPS (so its clip ranges transfer)."""
        return FLOW_LOG_PROBS[self.sde_type](x_next, mean, std)

    def kl(
        self, mean: torch.Tensor, reference_mean: torch.Tensor, std: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        """Flow-GRPO's KL penalty per sample at steps ``index`` (so ``train.kl_coef`` is its beta)."""
        return flow_grpo_kl(self.scheduler.sigmas, index, mean, reference_mean, std, self.sde_type)

    def predicted_x0(self, output: torch.Tensor, index: torch.Tensor | int, latents: torch.Tensor) -> torch.Tensor:
        """x - s v: the clean latents the velocity at step ``index`` implies (float32, differentiable)."""
        s = self.scheduler.sigmas.to(latents.device, torch.float32)[index]
        return latents.float() - s.reshape(-1, *[1] * (latents.ndim - 1)) * output.float()

    def noised(self, latents: torch.Tensor, noise: torch.Tensor, u: torch.Tensor):
        """The rectified-flow interpolation at s = the scheduler's shift of ``u`` in [0, 1) (one per sample), as
        its own schedule warps sigmas (Diffusion-DPO, ReFL's pre-training): a fixed shift, or one by these
        latents' size where the scheduler shifts dynamically (FLUX; its 2x2 patches are the image tokens, as
        FluxPipeline packs them; SD3's loading refuses such a scheduler; at the sampler's step count where the
        shift depends on it, FLUX.2's); the transformer's timesteps (s x num_train_timesteps) and the velocity
        target noise - x0."""
        scheduler = self.scheduler
        if scheduler.config.get("use_dynamic_shifting"):
            # the sampler's step count; before any schedule is set (the scheduler has none yet), the shift's default
            mu = self.mu(latents.shape[-2] * latents.shape[-1] // 4, getattr(scheduler, "num_inference_steps", None))
            s = scheduler.time_shift(mu, 1.0, u)
        else:
            shift = scheduler.config.get("shift", 1.0)
            s = shift * u / (1 + (shift - 1) * u)
        return rectified_flow_noised(latents, noise, s, scheduler.config.num_train_timesteps)

    def noised_at(self, latents: torch.Tensor, noise: torch.Tensor, index: torch.Tensor):
        """x_s = (1 - s) x0 + s noise at s = sigmas[index] of the sampler's schedule (one per sample; DiffusionNFT
        and AWM train at the sampler's own steps), the transformer's timesteps, the velocity target noise - x0
        and the time s."""
        scheduler = self.scheduler
        s = scheduler.sigmas.to(latents.device, torch.float32)[index]
        sigma = s.view(-1, *[1] * (latents.ndim - 1))
        return (1 - sigma) * latents + sigma * noise, scheduler.timesteps.to(latents.device)[index], noise - latents, s
