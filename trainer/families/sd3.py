"""The SD3 family: a flow-matching MMDiT transformer on the CLIP pair (and T5 when present), sampled with
Flow-GRPO's SDE step (trainer/families/flow.py; Liu et al. 2025, github.com/yifan123/flow_grpo).

The transformer predicts a velocity; the scheduler's sigmas run from 1 (noise) to 0 (image). Sampling the
ODE (``sample.eta`` 0) is the scheduler's own Euler step; ``sample.eta`` > 0 is Flow-GRPO's noise level
(0.7 in its SD3.5 runs), which makes each step a Gaussian with a log-prob (``sample.sde_type cps``: its
coefficients-preserving variant). T5 (``text_encoder_3``) is optional, as in StableDiffusion3Pipeline:
without it its tokens are zeros.

The sampler's dynamics are composed in: ``self.dynamics`` is a FlowMatching (trainer/families/flow.py: the SDE or
CPS step, its log-prob and KL, the rectified-flow forward process) on the pipeline's scheduler, and ``self.vae``
the shared VAE code, which honours the latent shift SD3's VAE has (trainer/families/vae.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from trainer.families.flow import FlowMatching, load_flow_pipeline
from trainer.families.sd1 import guided, save_lora_layers
from trainer.families.vae import VAE
from trainer.families.zero_t5 import T5_TOKENS, use_one_zero_token

if TYPE_CHECKING:
    from trainer.config import Config


class SD3:
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser_name = "transformer"  # the pipeline component that is trained (and its folder when saved whole)
    shard_blocks = ("JointTransformerBlock",)  # run.sharding's units: the MMDiT's joint blocks

    def __init__(self, pipe, sde_type: str = "sde"):
        self.pipe, self.dynamics, self.vae = pipe, FlowMatching(pipe.scheduler, sde_type), VAE(pipe.vae)

    @classmethod
    def load(cls, path: str, cfg: Config, dtype: torch.dtype) -> "SD3":
        from diffusers import DiffusionPipeline, StableDiffusion3Pipeline

        revision = cfg.pretrained.revision
        index = DiffusionPipeline.load_config(path, revision=revision)
        absent = {"text_encoder_3": None, "tokenizer_3": None}  # a pipeline saved without T5 records it as null
        kwargs = absent if not cfg.pretrained.load_t5 or index.get("text_encoder_3", [None])[0] is None else {}
        pipe = load_flow_pipeline(StableDiffusion3Pipeline, path, cfg, dtype, **kwargs)
        if pipe.scheduler.config.get("use_dynamic_shifting"):
            raise ValueError(
                "pretrained.model: its scheduler shifts sigmas by resolution (use_dynamic_shifting); "
                "set a fixed shift in scheduler/scheduler_config.json"
            )
        if pipe.text_encoder_3 is None:
            use_one_zero_token(pipe)
        return cls(pipe, cfg.sample.sde_type)

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_name)

    def frozen_modules(self) -> list[torch.nn.Module]:
        pipe = self.pipe
        return [
            m
            for m in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, pipe.transformer)
            if m is not None
        ]

    def native_resolution(self) -> int:
        return self.pipe.transformer.config.sample_size * self.pipe.vae_scale_factor

    # -- conditioning and prediction -------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], resolution: int | None = None) -> dict[str, torch.Tensor]:
        """The pipeline's own encoding: CLIP hidden states padded to T5's width, then T5's 256 tokens (without
        T5, its 256 zeros as one token that ZeroT5Attention counts 256 times: the same prediction, a fraction of
        the compute); the two CLIP pooled outputs side by side (``resolution``: unused, SD3 has no size
        conditioning)."""
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.pipe.transformer.device,
            do_classifier_free_guidance=False,
            max_sequence_length=T5_TOKENS if self.pipe.text_encoder_3 else 1,
        )
        return {"prompt_embeds": embeds, "pooled_projections": pooled}

    @staticmethod
    def predict(
        model,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond: dict[str, torch.Tensor],
        negative: dict[str, torch.Tensor] | None,
        guidance_scale: float,
    ) -> torch.Tensor:
        """The velocity, with classifier-free guidance when ``negative`` is given."""

        def call(x, t, c):
            return model(
                hidden_states=x,
                timestep=t,
                encoder_hidden_states=c["prompt_embeds"],
                pooled_projections=c["pooled_projections"],
                return_dict=False,
            )[0]

        return guided(call, latents, timesteps, cond, negative, guidance_scale)

    def initial_latents(self, n: int, resolution: int, generator, device) -> torch.Tensor:
        """The sampler's x_1 for ``n`` images of ``resolution`` px: the transformer's channels on the VAE's grid."""
        size = resolution // self.pipe.vae_scale_factor
        return self.dynamics.prior((n, self.pipe.transformer.config.in_channels, size, size), generator, device)

    def save_lora(self, layers: dict[str, torch.Tensor], folder: Path) -> None:
        save_lora_layers(self.pipeline_class, self.denoiser_name, layers, folder)
