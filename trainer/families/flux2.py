"""The FLUX.2 [klein] family (Black Forest Labs, FLUX.2 [klein] 4B and 9B; diffusers' Flux2KleinPipeline): a
flow-matching transformer of double- and single-stream blocks on a Qwen3 model's hidden states, sampled with
Flow-GRPO's SDE step as SD3 and FLUX.1 are (trainer/families/flow.py; Liu et al. 2025, github.com/yifan123/flow_grpo;
Flow-Factory trains the same pipeline, github.com/X-GenGroup/Flow-Factory, models/flux/flux2_klein.py).

What differs from FLUX.1 (trainer/families/flux.py), and where it lives here:

- The prompt tokens are Qwen3's, not T5's and CLIP's: each prompt is wrapped in Qwen3's chat template (a user
  turn, then the assistant's with thinking disabled), padded to ``pretrained.max_sequence_length`` tokens
  (default the pipeline's 512, fewer where the tokenizer's model_max_length is smaller), and the hidden states of
  layers 9, 18 and 27 are laid side by side per token. There is no pooled embedding. The pipeline's own
  ``encode_prompt`` does it.
- Latents: the VAE has 32 channels (FLUX.1's 16), and the pipeline draws and denoises them 2x2-patchified (128
  channels on a grid of half the size) and normalised by the VAE's batch-norm running statistics (``vae.bn``).
  The trainer sees them as (N, 32, h, w) on the VAE's grid, as FLUX.1's (N, 16, h, w): the patchified,
  normalised latents with each patch put back in place (a permutation). ``predict`` packs them into h w / 4
  tokens of 128 channels exactly as FLUX.1 packs (its ``pack``/``unpack``: the same order as Flux2's patchify then
  flatten), with FLUX.2's 4-axis rotary ids (t, h, w, l); ``Flux2VAE`` undoes the normalisation before decoding.
- The schedule's shift is FLUX.2's ``compute_empirical_mu`` of the image tokens and the number of steps (FLUX.1's
  depends on the tokens alone), set for the run's resolution when the family loads.
- Guidance: klein has no guidance input (``guidance=None``). The distilled models (``is_distilled`` in the
  pipeline's config: FLUX.2-klein-4B/9B, 4 steps) ignore the guidance scale, as the pipeline does: every
  prediction is the conditional one. The base models (FLUX.2-klein-base-4B/9B) take real classifier-free
  guidance above scale 1, as the pipeline: a second pass on the negative prompt's tokens ("" encoded as a prompt),
  uncond + w (cond - uncond), the two passes run one after the other as the pipeline runs them. The plain
  conditional prediction (no negative: DiffusionNFT, AWM, Diffusion-DPO, ReFL without CFG) is the conditional
  velocity, as for SD3.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from trainer.families.flow import FlowMatching, check_resolution, load_flow_pipeline, packed_latent_size
from trainer.families.flux import pack, unpack
from trainer.families.sd1 import save_lora_layers
from trainer.families.vae import VAE

if TYPE_CHECKING:
    from trainer.config import Config

PIPELINE_TOKENS = 512  # Flux2KleinPipeline's default max_sequence_length
PIPELINE_STEPS = 50  # its default num_inference_steps


def empirical_mu(image_tokens: int, num_steps: int | None, default_steps: int = PIPELINE_STEPS) -> float:
    """Flux2KleinPipeline's shift of the schedule (its compute_empirical_mu) for ``num_steps`` sampler steps, or
    ``default_steps`` (the run's) before any schedule is set (Diffusion-DPO's noising)."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    return compute_empirical_mu(image_seq_len=image_tokens, num_steps=num_steps or default_steps)


class Flux2VAE(VAE):
    """Flux2KleinPipeline's latent normalisation around the shared VAE code: the latents here are the VAE's,
    2x2-patchified, normalised by ``vae.bn``'s running mean and std, and put back on the VAE's grid."""

    def _stats(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The patchified latents' mean and std, (1, 4C, 1, 1), as the pipeline computes them."""
        vae = self.autoencoder
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        return mean, std.to(latents.device, latents.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], (N, 3, H, W), float32; differentiable (the pipeline's un-normalising and decoding)."""
        from diffusers import Flux2KleinPipeline as P

        vae = self.autoencoder
        mean, std = self._stats(latents)
        raw = P._unpatchify_latents(P._patchify_latents(latents) * std + mean)
        images = vae.decode(raw.to(vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def encode(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        """Normalised latents of images in [0, 1], (N, 3, H, W) (the pipeline's ``_encode_vae_image``, with a
        sample of the posterior as the other families' training targets take)."""
        from diffusers import Flux2KleinPipeline as P

        vae = self.autoencoder
        raw = vae.encode((images * 2 - 1).to(vae.dtype)).latent_dist.sample(generator)
        patches = P._patchify_latents(raw)
        mean, std = self._stats(patches)
        return P._unpatchify_latents((patches - mean) / std)


class Flux2:
    pipeline_class = "Flux2KleinPipeline"
    denoiser_name = "transformer"  # the pipeline component that is trained (and its folder when saved whole)
    # run.sharding's units: the double- and single-stream blocks
    shard_blocks = ("Flux2TransformerBlock", "Flux2SingleTransformerBlock")

    def __init__(
        self,
        pipe,
        sde_type: str = "sde",
        resolution: int | None = None,
        max_sequence_length: int | None = None,
        num_steps: int = PIPELINE_STEPS,
    ):
        self.pipe = pipe
        self.distilled = bool(pipe.config.get("is_distilled"))  # guidance-distilled: no CFG, as the pipeline
        self.max_sequence_length = max_sequence_length or min(PIPELINE_TOKENS, pipe.tokenizer.model_max_length)
        self.resolution = resolution or self.native_resolution()
        tokens = (self.latent_size(self.resolution) // 2) ** 2  # the 2x2-packed tokens the schedule is shifted for
        shift = functools.partial(empirical_mu, default_steps=num_steps)
        self.dynamics, self.vae = FlowMatching(pipe.scheduler, sde_type, tokens, shift=shift), Flux2VAE(pipe.vae)

    @classmethod
    def load(cls, path: str, cfg: Config, dtype: torch.dtype) -> "Flux2":
        from diffusers import Flux2KleinPipeline

        pipe = load_flow_pipeline(Flux2KleinPipeline, path, cfg, dtype)
        return cls(
            pipe,
            cfg.sample.sde_type,
            cfg.sample.resolution,
            cfg.pretrained.max_sequence_length,
            cfg.sample.num_steps,
        )

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_name)

    def frozen_modules(self) -> list[torch.nn.Module]:
        pipe = self.pipe
        return [pipe.vae, pipe.text_encoder, pipe.transformer]

    def native_resolution(self) -> int:
        """The VAE's sample size (1024 for FLUX.2, the pipeline's default size 128 x 8): the transformer records
        none."""
        return self.pipe.vae.config.sample_size

    # -- conditioning and prediction -------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], resolution: int | None = None) -> dict[str, torch.Tensor]:
        """The pipeline's own encoding: Qwen3's chat-templated tokens, layers 9, 18 and 27 side by side
        (``resolution``: unused)."""
        embeds, _ = self.pipe.encode_prompt(
            prompts, device=self.pipe.transformer.device, max_sequence_length=self.max_sequence_length
        )
        return {"prompt_embeds": embeds}

    def predict(
        self,
        model,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond: dict[str, torch.Tensor],
        negative: dict[str, torch.Tensor] | None,
        guidance_scale: float,
    ) -> torch.Tensor:
        """The velocity for (N, C, h, w) latents, as Flux2KleinPipeline calls the transformer: 2x2-packed tokens
        with their ids, timesteps / 1000, no guidance input; with a negative, a base model's CFG above scale 1
        (module docstring)."""
        n, _, h, w = latents.shape
        timesteps = timesteps.expand(n) if timesteps.ndim == 0 else timesteps
        tokens, ids = pack(latents), image_ids(h // 2, w // 2, latents.device)

        def call(embeds: torch.Tensor) -> torch.Tensor:
            return model(
                hidden_states=tokens,
                timestep=timesteps / 1000,
                guidance=None,
                encoder_hidden_states=embeds.expand(n, -1, -1),  # the negative: one prompt's, for all
                txt_ids=text_ids(embeds.shape[1], latents.device),
                img_ids=ids,
                return_dict=False,
            )[0]

        velocity = call(cond["prompt_embeds"])
        if negative is not None and guidance_scale > 1 and not self.distilled:
            uncond = call(negative["prompt_embeds"])
            velocity = uncond + guidance_scale * (velocity - uncond)
        return unpack(velocity, h, w)

    # -- the latents ----------------------------------------------------------------------------------------
    def latent_size(self, resolution: int) -> int:
        """Latent rows (= columns) of a ``resolution`` px image, even for the 2x2 packing (as the pipeline rounds)."""
        return packed_latent_size(self.pipe.vae_scale_factor, resolution)

    def initial_latents(self, n: int, resolution: int, generator, device) -> torch.Tensor:
        """The pipeline's noise, drawn patchified (n, 4C, h / 2, w / 2) from the same generator, put back on the
        VAE's grid: (n, C, h, w)."""
        from diffusers import Flux2KleinPipeline

        check_resolution(resolution, self.resolution, "the FLUX.2 schedule")
        size = self.latent_size(resolution) // 2
        noise = self.dynamics.prior((n, self.pipe.transformer.config.in_channels, size, size), generator, device)
        return Flux2KleinPipeline._unpatchify_latents(noise)

    def save_lora(self, layers: dict[str, torch.Tensor], folder: Path) -> None:
        save_lora_layers(self.pipeline_class, self.denoiser_name, layers, folder)


def image_ids(rows: int, cols: int, device) -> torch.Tensor:
    """The packed tokens' rotary ids, (rows cols, 4): (0, row, column, 0), row-major (the pipeline's
    _prepare_latent_ids; the transformer takes one batch row of them)."""
    one = torch.arange(1)
    return torch.cartesian_prod(one, torch.arange(rows), torch.arange(cols), one).to(device)


def text_ids(length: int, device) -> torch.Tensor:
    """The prompt tokens' rotary ids, (length, 4): (0, 0, 0, l) (the pipeline's _prepare_text_ids)."""
    one = torch.arange(1)
    return torch.cartesian_prod(one, one, one, torch.arange(length)).to(device)
