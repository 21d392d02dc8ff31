"""The SDXL family: a UNet on two CLIP text encoders (penultimate hidden states concatenated; the second's
pooled projection and the micro-conditioning (original size, crop, target size) feed its "text_time"
embedding), sampled with DDIM like SD1.

Its dynamics are SD1's: ``self.dynamics`` a DDIM (trainer/families/ddim.py) on the pipeline's scheduler and
``self.vae`` the shared VAE code (trainer/families/vae.py); what this file holds is what differs from SD1, the
loading, the conditioning and the prediction.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from trainer.families.ddim import DDIM
from trainer.families.sd1 import guided, load_with_ddim, save_lora_layers
from trainer.families.vae import VAE

if TYPE_CHECKING:
    from trainer.config import Config


class SDXL:
    pipeline_class = "StableDiffusionXLPipeline"
    denoiser_name = "unet"  # the pipeline component that is trained (and its folder when saved whole)
    # run.sharding's units: the UNet's down, mid and up blocks
    shard_blocks = ("CrossAttnDownBlock2D", "DownBlock2D", "UNetMidBlock2DCrossAttn", "CrossAttnUpBlock2D", "UpBlock2D")

    def __init__(self, pipe):
        self.pipe, self.dynamics, self.vae = pipe, DDIM(pipe.scheduler), VAE(pipe.vae)

    @classmethod
    def load(cls, path: str, cfg: Config, dtype: torch.dtype) -> "SDXL":
        from diffusers import StableDiffusionXLPipeline

        pipe = load_with_ddim(StableDiffusionXLPipeline, path, cfg, dtype)
        if pipe.vae.config.get("force_upcast") and dtype == torch.float16:
            pipe.vae.to(torch.float32)  # SDXL's VAE overflows in fp16, as the pipeline itself knows
        return cls(pipe)

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_name)

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.pipe.vae, self.pipe.text_encoder, self.pipe.text_encoder_2, self.pipe.unet]

    def native_resolution(self) -> int:
        return self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor

    def initial_latents(self, n: int, resolution: int, generator, device) -> torch.Tensor:
        """The sampler's x_T for ``n`` images of ``resolution`` px: the UNet's channels on the VAE's grid."""
        size = resolution // self.pipe.vae_scale_factor
        return self.dynamics.prior((n, self.pipe.unet.config.in_channels, size, size), generator, device)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], resolution: int | None = None) -> dict[str, torch.Tensor]:
        """Hidden states, pooled embedding and time ids, as StableDiffusionXLPipeline.encode_prompt makes them
        (an all-empty batch is zeros, its force_zeros_for_empty_prompt: the negative prompt of guidance).
        The time ids are the micro-conditioning for ``resolution`` px (default: native) images, uncropped."""
        pipe = self.pipe
        hidden, pooled = [], None
        for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
            ids = tokenizer(
                prompts,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.pipe.unet.device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder's projected pooled output
        embeds = torch.cat(hidden, dim=-1)
        if all(p == "" for p in prompts) and pipe.config.get("force_zeros_for_empty_prompt", True):
            embeds, pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        size = resolution or self.native_resolution()
        time_ids = torch.tensor(
            [[size, size, 0, 0, size, size]] * len(prompts), dtype=embeds.dtype, device=embeds.device
        )
        return {"prompt_embeds": embeds, "text_embeds": pooled, "time_ids": time_ids}

    @staticmethod
    def predict(
        model,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond: dict[str, torch.Tensor],
        negative: dict[str, torch.Tensor] | None,
        guidance_scale: float,
    ) -> torch.Tensor:
        def call(x, t, c):
            extra = {"text_embeds": c["text_embeds"], "time_ids": c["time_ids"]}
            return model(x, t, encoder_hidden_states=c["prompt_embeds"], added_cond_kwargs=extra).sample

        if negative is not None:  # the pipeline's negative micro-conditioning is the prompt's own
            negative = {**negative, "time_ids": cond["time_ids"]}
        return guided(call, latents, timesteps, cond, negative, guidance_scale)

    def save_lora(self, layers: dict[str, torch.Tensor], folder: Path) -> None:
        save_lora_layers(self.pipeline_class, self.denoiser_name, layers, folder)
