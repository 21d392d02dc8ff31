"""The SD3 family: a flow-matching MMDiT transformer on the CLIP pair (and T5 when present), sampled with
Flow-GRPO's SDE step (trainer/flow.py; Liu et al. 2025, github.com/yifan123/flow_grpo).

The transformer predicts a velocity; the scheduler's sigmas run from 1 (noise) to 0 (image). Sampling the
ODE (``sample.eta`` 0) is the scheduler's own Euler step; ``sample.eta`` > 0 is Flow-GRPO's noise level
(0.7 in its SD3.5 runs), which makes each step a Gaussian with a log-prob (``sample.sde_type cps``: its
coefficients-preserving variant). T5 (``text_encoder_3``) is optional, as in StableDiffusion3Pipeline:
without it its tokens are zeros.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from trainer.flow import FLOW_STEPS
from trainer.sd1 import dtype_kwarg, guided


class SD3:
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser_name = "transformer"  # the pipeline component that is trained (and its folder when saved whole)

    def __init__(self, pipe, sde_type: str = "sde"):
        self.pipe, self.sde_type = pipe, sde_type

    @classmethod
    def load(cls, path: str, revision: str | None, dtype: torch.dtype, num_steps: int, load_t5: bool = True,
             sde_type: str = "sde") -> "SD3":
        from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

        index = DiffusionPipeline.load_config(path, revision=revision)
        absent = {"text_encoder_3": None, "tokenizer_3": None}  # a pipeline saved without T5 records it as null
        kwargs = absent if not load_t5 or index.get("text_encoder_3", [None])[0] is None else {}
        pipe = StableDiffusion3Pipeline.from_pretrained(path, revision=revision, **kwargs, **dtype_kwarg(dtype))
        if not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
            raise ValueError(f"pretrained.model: the SDE step models FlowMatchEulerDiscreteScheduler's sigmas, "
                             f"not a {type(pipe.scheduler).__name__}")
        if pipe.scheduler.config.get("use_dynamic_shifting"):
            raise ValueError("pretrained.model: its scheduler shifts sigmas by resolution (use_dynamic_shifting); "
                             "set a fixed shift in scheduler/scheduler_config.json")
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, sde_type)

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_name)

    def frozen_modules(self) -> list[torch.nn.Module]:
        pipe = self.pipe
        return [m for m in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, pipe.transformer)
                if m is not None]

    def native_resolution(self) -> int:
        return self.pipe.transformer.config.sample_size * self.pipe.vae_scale_factor

    # -- conditioning and prediction -------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], resolution: int | None = None) -> dict[str, torch.Tensor]:
        """The pipeline's own encoding: CLIP hidden states padded to T5's width, then T5's 256 tokens (zeros
        without T5); the two CLIP pooled outputs side by side (``resolution``: unused, SD3 has no size conditioning)."""
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompts, prompt_2=None, prompt_3=None, device=self.pipe.transformer.device,
            do_classifier_free_guidance=False,
        )
        return {"prompt_embeds": embeds, "pooled_projections": pooled}

    @staticmethod
    def predict(model, latents: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor],
                negative: dict[str, torch.Tensor] | None, guidance_scale: float) -> torch.Tensor:
        """The velocity, with classifier-free guidance when ``negative`` is given."""
        def call(x, t, c):
            return model(hidden_states=x, timestep=t, encoder_hidden_states=c["prompt_embeds"],
                         pooled_projections=c["pooled_projections"], return_dict=False)[0]

        return guided(call, latents, timesteps, cond, negative, guidance_scale)

    # -- the stochastic step ---------------------------------------------------------------------------------
    def timesteps(self, num_steps: int, device) -> torch.Tensor:
        self.pipe.scheduler.set_timesteps(num_steps, device=device)
        return self.pipe.scheduler.timesteps

    def initial_latents(self, n: int, resolution: int, generator, device) -> torch.Tensor:
        size = resolution // self.pipe.vae_scale_factor
        shape = (n, self.pipe.transformer.config.in_channels, size, size)
        return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)

    def step(self, output: torch.Tensor, index: torch.Tensor | int, latents: torch.Tensor, eta: float):
        """Mean and std of p(x_next | x) at step ``index`` of the schedule (Flow-GRPO's SDE or CPS step, float32)."""
        return FLOW_STEPS[self.sde_type](self.pipe.scheduler.sigmas, index, output, latents, noise_level=eta)

    # -- pixels ----------------------------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], (N, 3, H, W), float32; differentiable."""
        vae = self.pipe.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        return (vae.decode(latents).sample.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def to_uint8(self, latents: torch.Tensor) -> np.ndarray:
        return (self.decode(latents) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    def encode(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        """Latents of images in [0, 1], (N, 3, H, W)."""
        vae = self.pipe.vae
        sample = vae.encode((images * 2 - 1).to(vae.dtype)).latent_dist.sample(generator)
        return (sample - vae.config.shift_factor) * vae.config.scaling_factor

    def save_lora(self, layers: dict[str, torch.Tensor], folder: Path) -> None:
        from diffusers import StableDiffusion3Pipeline

        StableDiffusion3Pipeline.save_lora_weights(folder, transformer_lora_layers=layers, safe_serialization=True)
