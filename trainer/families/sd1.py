"""The SD1.x / SD2.x family: a UNet on one CLIP text encoder, sampled with DDIM.

What the algorithms need from the model, in one place: load the pipeline, encode prompts into one conditioning
object, predict (with classifier-free guidance when asked), the initial latents' shape, and save LoRA so that the
family's own diffusers pipeline loads it. The sampler's dynamics are composed in, not written here:
``self.dynamics`` is a DDIM (trainer/families/ddim.py: the stochastic step, its log-prob and KL, the forward
process) on the pipeline's scheduler, and ``self.vae`` the shared VAE code (trainer/families/vae.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from trainer.families.ddim import DDIM, check_scheduler
from trainer.families.vae import VAE

if TYPE_CHECKING:
    from trainer.config import Config


class SD1:
    pipeline_class = "StableDiffusionPipeline"
    denoiser_name = "unet"  # the pipeline component that is trained (and its folder when saved whole)
    # run.sharding's units: the UNet's down, mid and up blocks
    shard_blocks = ("CrossAttnDownBlock2D", "DownBlock2D", "UNetMidBlock2DCrossAttn", "CrossAttnUpBlock2D", "UpBlock2D")

    def __init__(self, pipe):
        self.pipe, self.dynamics, self.vae = pipe, DDIM(pipe.scheduler), VAE(pipe.vae)

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
        return text_encoder(tokens.input_ids.to(self.pipe.unet.device))[0]  # where it runs, offloaded or not

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

    def initial_latents(self, n: int, resolution: int, generator, device) -> torch.Tensor:
        """The sampler's x_T for ``n`` images of ``resolution`` px: the UNet's channels on the VAE's grid."""
        size = resolution // self.pipe.vae_scale_factor
        return self.dynamics.prior((n, self.pipe.unet.config.in_channels, size, size), generator, device)

    # -- saving ----------------------------------------------------------------------------------------------
    def save_lora(self, layers: dict[str, torch.Tensor], folder: Path) -> None:
        save_lora_layers(self.pipeline_class, self.denoiser_name, layers, folder)


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


def save_lora_layers(pipeline_class: str, denoiser_name: str, layers: dict[str, torch.Tensor], folder: Path) -> None:
    """The denoiser's LoRA ``layers`` saved by the diffusers pipeline ``pipeline_class``'s own save_lora_weights
    (as its ``<denoiser_name>_lora_layers``), so that the pipeline's load_lora_weights loads them."""
    import diffusers

    getattr(diffusers, pipeline_class).save_lora_weights(
        folder, **{f"{denoiser_name}_lora_layers": layers}, safe_serialization=True
    )
