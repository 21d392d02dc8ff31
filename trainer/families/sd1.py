"""The SD1.x / SD2.x family: a UNet on one CLIP text encoder, sampled with DDIM.

Everything the algorithms need from a model family, in one place: load the pipeline, encode prompts into
one conditioning object, predict (with classifier-free guidance when asked), one stochastic step's mean and
std, decode latents to images differentiably, encode images to latents, and save LoRA so that the family's
own diffusers pipeline loads it. The rollout (trainer/sampling.py) and the algorithms see only these.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from trainer.families.ddim import check_scheduler, ddim_mean_std, ddim_x0, gaussian_log_prob
from trainer.loss import gaussian_kl

if TYPE_CHECKING:
    from trainer.config import Config


class SD1:
    pipeline_class = "StableDiffusionPipeline"
    denoiser_name = "unet"  # the pipeline component that is trained (and its folder when saved whole)

    def __init__(self, pipe):
        self.pipe = pipe

    # -- loading ---------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str, cfg: Config, dtype: torch.dtype) -> "SD1":
        """The pipeline with a DDIM scheduler, its parts in ``dtype``."""
        from diffusers import StableDiffusionPipeline

        return cls(
            load_with_ddim(
                StableDiffusionPipeline, path, cfg, dtype, safety_checker=None, requires_safety_checker=False
            )
        )

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_name)

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.pipe.vae, self.pipe.text_encoder, self.pipe.unet]

    def native_resolution(self) -> int:
        return self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor

    # -- conditioning and prediction -------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], resolution: int | None = None) -> torch.Tensor:
        """The text encoder's last hidden states (``resolution`` matters only to SDXL's micro-conditioning)."""
        tokenizer, text_encoder = self.pipe.tokenizer, self.pipe.text_encoder
        tokens = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        )
        return text_encoder(tokens.input_ids.to(text_encoder.device))[0]

    @staticmethod
    def predict(
        model,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond: torch.Tensor,
        negative: torch.Tensor | None,
        guidance_scale: float,
    ) -> torch.Tensor:
        """The model's prediction, with classifier-free guidance when ``negative`` is given."""
        return guided(lambda x, t, c: model(x, t, c).sample, latents, timesteps, cond, negative, guidance_scale)

    # -- the stochastic step ---------------------------------------------------------------------------------
    def timesteps(self, num_steps: int, device) -> torch.Tensor:
        scheduler = self.pipe.scheduler
        scheduler.set_timesteps(num_steps, device=device)
        # the step's constants on the device once, not copied from the host at every step
        scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)
        scheduler.final_alpha_cumprod = torch.as_tensor(scheduler.final_alpha_cumprod).to(device)
        return scheduler.timesteps

    def initial_latents(self, n: int, resolution: int, generator, device) -> torch.Tensor:
        size = resolution // self.pipe.vae_scale_factor
        shape = (n, self.pipe.unet.config.in_channels, size, size)
        return (
            torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
            * self.pipe.scheduler.init_noise_sigma
        )

    def step(self, output: torch.Tensor, index: torch.Tensor | int, latents: torch.Tensor, eta: float):
        """Mean and std of p(x_{t-1} | x_t) at step ``index`` of the schedule (DDIM, float32)."""
        scheduler = self.pipe.scheduler
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
        scheduler = self.pipe.scheduler
        return ddim_x0(scheduler, output, scheduler.timesteps.to(latents.device)[index], latents)

    # -- the training objective ------------------------------------------------------------------------------
    def noised(self, latents: torch.Tensor, noise: torch.Tensor, u: torch.Tensor):
        """The forward process at training timesteps drawn as ``u`` in [0, 1) (one per sample, uniform over
        the scheduler's training timesteps): the noisy latents, the timesteps and the model's regression
        target (the noise, or the velocity for a v-prediction model)."""
        scheduler = self.pipe.scheduler
        t = (u * scheduler.config.num_train_timesteps).long().clamp(max=scheduler.config.num_train_timesteps - 1)
        noisy = scheduler.add_noise(latents, noise, t)
        if scheduler.config.prediction_type == "v_prediction":
            return noisy, t, scheduler.get_velocity(latents, noise, t)
        return noisy, t, noise

    def noised_at(self, latents: torch.Tensor, noise: torch.Tensor, index: torch.Tensor):
        """The forward process at step ``index`` of the sampler's schedule (one per sample; DiffusionNFT and
        AWM train at the sampler's own steps): x_t, the denoiser's timesteps, the regression target (the noise,
        or the velocity for a v-prediction model) and the time in [0, 1] (t / num_train_timesteps)."""
        scheduler = self.pipe.scheduler
        t = scheduler.timesteps.to(latents.device)[index]
        target = (
            scheduler.get_velocity(latents, noise, t) if scheduler.config.prediction_type == "v_prediction" else noise
        )
        return scheduler.add_noise(latents, noise, t), t, target, t.float() / scheduler.config.num_train_timesteps

    # -- pixels ----------------------------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], (N, 3, H, W), float32; differentiable."""
        vae = self.pipe.vae
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + _shift(vae)).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def to_uint8(self, latents: torch.Tensor) -> np.ndarray:
        """Decoded uint8 NHWC numpy, made on the calling (main) thread: reward futures get numpy, never
        tensors (torch work handed to a helper thread competes with the training threads)."""
        return (self.decode(latents) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    def encode(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        """Latents of images in [0, 1], (N, 3, H, W) (for losses on real images: DPO, ReFL's pre-training)."""
        vae = self.pipe.vae
        posterior = vae.encode((images * 2 - 1).to(vae.dtype)).latent_dist
        return (posterior.sample(generator) - _shift(vae)) * vae.config.scaling_factor

    # -- saving ----------------------------------------------------------------------------------------------
    def save_lora(self, layers: dict[str, torch.Tensor], folder: Path) -> None:
        from diffusers import StableDiffusionPipeline

        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)


def guided(call, latents: torch.Tensor, timesteps: torch.Tensor, cond, negative, guidance_scale: float) -> torch.Tensor:
    """``call(latents, timesteps, cond)``, with classifier-free guidance when ``negative`` is given: the
    unconditional and conditional halves in one batch. ``cond`` is a tensor or a dict of tensors (every family
    guides this way)."""
    timesteps = timesteps.expand(latents.shape[0]) if timesteps.ndim == 0 else timesteps
    if negative is None or guidance_scale == 1:  # scale 1 is the conditional prediction itself
        return call(latents, timesteps, cond)
    if isinstance(cond, dict):
        both = {k: torch.cat([negative[k].expand_as(v), v]) for k, v in cond.items()}
    else:
        both = torch.cat([negative.expand_as(cond), cond])
    uncond, conditional = call(torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), both).chunk(2)
    return uncond + guidance_scale * (conditional - uncond)


def _shift(vae) -> float:
    """The VAE's latent shift: SD3's has one (0.0609), SD1's and SDXL's none."""
    return vae.config.get("shift_factor") or 0.0


def load_with_ddim(pipeline_class, path: str, cfg: Config, dtype: torch.dtype, **kwargs):
    """``pipeline_class.from_pretrained`` in ``dtype``, its scheduler replaced by DDIM (checked to be one the
    log-prob step models) and its progress bars off."""
    from diffusers import DDIMScheduler

    if cfg.sample.sde_type != "sde":  # before any weights load
        raise ValueError(
            f"sample.sde_type: {cfg.sample.sde_type} is a flow-matching step; a "
            f"{pipeline_class.__name__} samples with DDIM"
        )
    pipe = pipeline_class.from_pretrained(path, revision=cfg.pretrained.revision, **kwargs, **dtype_kwarg(dtype))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    check_scheduler(pipe.scheduler, cfg.sample.num_steps)  # before the weights move to the device
    pipe.set_progress_bar_config(disable=True)
    return pipe


def dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``from_pretrained``'s dtype argument: diffusers renamed torch_dtype to dtype in 0.36 and warns about the old."""
    import diffusers

    new = tuple(map(int, diffusers.__version__.split(".")[:2])) >= (0, 36)
    return {"dtype" if new else "torch_dtype": dtype}
