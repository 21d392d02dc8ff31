"""The FLUX.1 family (Black Forest Labs; diffusers' FluxPipeline): a flow-matching transformer of double- and
single-stream blocks on CLIP-L's pooled output and T5's tokens, sampled with Flow-GRPO's SDE step as SD3 is
(trainer/families/flow.py; Liu et al. 2025, github.com/yifan123/flow_grpo, scripts/train_flux.py).

What differs from SD3, and where it lives here:

- Latents are (N, 16, h, w) everywhere in the trainer, as SD3's; ``predict`` packs them into 2x2 patches of 64
  channels (h w / 4 tokens, with their row/column rotary ids) for the transformer and unpacks its output. The
  packing is a permutation, so the dynamics are SD3's own (``self.dynamics``, a FlowMatching: the SDE step, its
  log-prob, a mean over all elements, and the KL) on the unpacked latents: the step's mean and std element for
  element those of the packed ones (as Flow-GRPO's FLUX script computes them), the log-prob up to the order of
  its sum.
- The sigmas are shifted by image size (FluxPipeline's ``calculate_shift``: mu linear in the number of image
  tokens, then the scheduler's exponential time shift), so the schedule is set for the run's resolution
  (``sample.resolution``, default the VAE's native 1024 px), fixed when the family loads: the FlowMatching
  dynamics hold its image tokens.
- FLUX.1-dev is guidance-distilled: guidance is a transformer input (``guidance_embeds``), never a second,
  unconditional pass. ``sample.guidance_scale`` is that input (3.5 in FluxPipeline and Flow-GRPO's FLUX runs).
  A caller asking for guidance (a negative prompt and a scale w: sampling, evaluation, DDPO's re-scoring) gets
  the input w; the plain conditional prediction (no negative: what DiffusionNFT, AWM, Diffusion-DPO and
  ReFL without CFG train) gets the run's ``sample.guidance_scale``, since a distilled model has no guidance-free
  prediction. FLUX.1-schnell-like models (no ``guidance_embeds``) take no guidance: the scale is ignored, as
  FluxPipeline ignores it. FluxPipeline's ``true_cfg_scale`` (a real negative-prompt pass) is not supported.
- T5 encodes ``pretrained.max_sequence_length`` tokens (default: FluxPipeline's 512, or fewer where the
  tokenizer's model_max_length is smaller; Flow-GRPO's FLUX script encodes 128).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from trainer.families.flow import FlowMatching, check_resolution, load_flow_pipeline, packed_latent_size
from trainer.families.sd1 import save_lora_layers
from trainer.families.vae import VAE

if TYPE_CHECKING:
    from trainer.config import Config

PIPELINE_TOKENS = 512  # FluxPipeline's default max_sequence_length
PIPELINE_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale


class Flux:
    pipeline_class = "FluxPipeline"
    denoiser_name = "transformer"  # the pipeline component that is trained (and its folder when saved whole)
    # run.sharding's units: the double- and single-stream blocks
    shard_blocks = ("FluxTransformerBlock", "FluxSingleTransformerBlock")

    def __init__(
        self,
        pipe,
        sde_type: str = "sde",
        resolution: int | None = None,
        guidance: float = PIPELINE_GUIDANCE,
        max_sequence_length: int | None = None,
    ):
        self.pipe, self.guidance = pipe, guidance
        self.guided = bool(pipe.transformer.config.get("guidance_embeds"))
        self.max_sequence_length = max_sequence_length or min(PIPELINE_TOKENS, pipe.tokenizer_2.model_max_length)
        self.resolution = resolution or self.native_resolution()
        tokens = (self.latent_size(self.resolution) // 2) ** 2  # the 2x2-packed tokens the schedule is shifted for
        self.dynamics, self.vae = FlowMatching(pipe.scheduler, sde_type, tokens), VAE(pipe.vae)

    @classmethod
    def load(cls, path: str, cfg: Config, dtype: torch.dtype) -> "Flux":
        from diffusers import FluxPipeline

        if not cfg.pretrained.load_t5:  # before any weights load
            raise ValueError(
                "pretrained.load_t5: false leaves SD3's T5 out; FLUX's prompt tokens are T5's, which "
                "FluxPipeline cannot do without"
            )
        pipe = load_flow_pipeline(FluxPipeline, path, cfg, dtype)
        if pipe.vae.config.get("force_upcast") and dtype == torch.float16:
            pipe.vae.to(torch.float32)  # as SDXL's, FLUX's VAE overflows in fp16
        return cls(
            pipe,
            cfg.sample.sde_type,
            cfg.sample.resolution,
            cfg.sample.guidance_scale,
            cfg.pretrained.max_sequence_length,
        )

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_name)

    def frozen_modules(self) -> list[torch.nn.Module]:
        pipe = self.pipe
        return [pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.transformer]

    def native_resolution(self) -> int:
        """The VAE's sample size (1024 for FLUX.1; FluxPipeline's default size is the same 128 x 8): the transformer
        records none."""
        return self.pipe.vae.config.sample_size

    # -- conditioning and prediction -------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], resolution: int | None = None) -> dict[str, torch.Tensor]:
        """The pipeline's own encoding: T5's tokens and CLIP's pooled output (``resolution``: unused)."""
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompts, prompt_2=None, device=self.pipe.transformer.device, max_sequence_length=self.max_sequence_length
        )
        return {"prompt_embeds": embeds, "pooled_projections": pooled}

    def predict(
        self,
        model,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond: dict[str, torch.Tensor],
        negative: dict[str, torch.Tensor] | None,
        guidance_scale: float,
    ) -> torch.Tensor:
        """The velocity for (N, 16, h, w) latents, as FluxPipeline calls the transformer: 2x2-packed tokens,
        timesteps / 1000, the guidance input (module docstring: ``negative`` itself is never run)."""
        n, c, h, w = latents.shape
        timesteps = timesteps.expand(n) if timesteps.ndim == 0 else timesteps
        guidance = None
        if self.guided:
            scale = guidance_scale if negative is not None else self.guidance
            guidance = torch.full((n,), scale, device=latents.device, dtype=torch.float32)
        embeds = cond["prompt_embeds"]
        tokens = model(
            hidden_states=pack(latents),
            timestep=timesteps / 1000,
            guidance=guidance,
            pooled_projections=cond["pooled_projections"],
            encoder_hidden_states=embeds,
            txt_ids=torch.zeros(embeds.shape[1], 3, device=latents.device),
            img_ids=image_ids(h // 2, w // 2, latents.device),
            return_dict=False,
        )[0]
        return unpack(tokens, h, w)

    # -- the latents ----------------------------------------------------------------------------------------
    def latent_size(self, resolution: int) -> int:
        """Latent rows (= columns) of a ``resolution`` px image, even for the 2x2 packing (as FluxPipeline rounds)."""
        return packed_latent_size(self.pipe.vae_scale_factor, resolution)

    def initial_latents(self, n: int, resolution: int, generator, device) -> torch.Tensor:
        """FluxPipeline's noise before it packs it: (n, 16, h, w), the same numbers from the same generator."""
        check_resolution(resolution, self.resolution, "the FLUX schedule")
        size = self.latent_size(resolution)
        return self.dynamics.prior((n, self.pipe.transformer.config.in_channels // 4, size, size), generator, device)

    def save_lora(self, layers: dict[str, torch.Tensor], folder: Path) -> None:
        save_lora_layers(self.pipeline_class, self.denoiser_name, layers, folder)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N, h w / 4, 4 C): each 2x2 patch one token, row-major (FluxPipeline's packing)."""
    n, c, h, w = latents.shape
    return latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, h * w // 4, c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of ``pack``."""
    n, _, channels = tokens.shape
    return tokens.view(n, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, channels // 4, h, w)


def image_ids(rows: int, cols: int, device) -> torch.Tensor:
    """The packed tokens' rotary position ids, (rows cols, 3): 0, then each token's row and column."""
    ids = torch.zeros(rows, cols, 3, device=device)
    ids[..., 1] = torch.arange(rows, device=device)[:, None]
    ids[..., 2] = torch.arange(cols, device=device)[None, :]
    return ids.reshape(rows * cols, 3)
