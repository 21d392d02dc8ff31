"""The Z-Image family (Tongyi-MAI/Z-Image and Z-Image-Turbo; diffusers' ZImagePipeline): a single-stream
flow-matching transformer (ZImageTransformer2DModel) on a Qwen3 text encoder's second-to-last hidden states,
sampled with Flow-GRPO's SDE step as SD3 and FLUX are (trainer/families/flow.py; Flow-Factory's Z-Image adapter,
github.com/X-GenGroup/Flow-Factory src/flow_factory/models/z_image/z_image.py, trains it the same way).

What differs from SD3 and FLUX, and where it lives here:

- The transformer takes lists: one (C, 1, h, w) latent per image and one caption per prompt holding only its real
  tokens (ZImagePipeline drops the padding by the attention mask, so captions differ in length). The trainer
  keeps (N, C, h, w) latents and, for the conditioning, tensors it can index and concatenate: the hidden states
  padded to ``max_sequence_length`` tokens with their mask (``prompt_embeds``, ``prompt_mask``); ``predict``
  unpads them into the pipeline's lists and stacks the outputs back.
- The model's timestep input is 1 - sigma ((1000 - t) / 1000) and its output is minus the velocity
  (ZImagePipeline negates it before the scheduler's step); ``predict`` returns the velocity the dynamics expect.
- Classifier-free guidance is ZImagePipeline's ``pos + g (pos - neg)``, g = 0 meaning none. The trainer's
  ``sample.guidance_scale`` w keeps its meaning for every family (uncond + w (cond - uncond), 1 = none), so
  g = w - 1: ZImagePipeline's guidance_scale 4 (Flow-Factory's Z-Image runs, the model card's 3 to 5) is w = 5
  here. The conditional and unconditional halves go through one transformer call, as in the pipeline.
  ZImagePipeline's cfg_normalization (a cap on the guided prediction's norm) and cfg_truncation (no guidance
  late in sampling) are off at its defaults and not supported here.
- The sigmas are ZImagePipeline's torch float32 ``linspace(1, 1 / n, n)`` (its get_default_z_image_sigmas), which
  differ from FluxPipeline's float64 ones in the last bit, then the scheduler's shift: a fixed one (Z-Image-Turbo:
  3) or, where the scheduler shifts dynamically, FLUX's by image tokens (2x2 patches), fixed when the family loads.
- The LoRA saved loads with ZImagePipeline.load_lora_weights (ZImageLoraLoaderMixin).
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

PIPELINE_TOKENS = 512  # ZImagePipeline's default max_sequence_length


class ZImage:
    pipeline_class = "ZImagePipeline"
    denoiser_name = "transformer"  # the pipeline component that is trained (and its folder when saved whole)
    # run.sharding's units: the noise and context refiners' blocks and the main layers are all this class
    shard_blocks = ("ZImageTransformerBlock",)

    def __init__(
        self, pipe, sde_type: str = "sde", resolution: int | None = None, max_sequence_length: int | None = None
    ):
        from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas

        self.pipe, self.max_sequence_length = pipe, max_sequence_length or PIPELINE_TOKENS
        self.resolution = resolution or self.native_resolution()
        tokens = (self.latent_size(self.resolution) // 2) ** 2  # the 2x2 patches the pipeline's mu is computed for
        self.dynamics = FlowMatching(pipe.scheduler, sde_type, tokens, sigmas=get_default_z_image_sigmas)
        self.vae = VAE(pipe.vae)

    @classmethod
    def load(cls, path: str, cfg: Config, dtype: torch.dtype) -> "ZImage":
        from diffusers import ZImagePipeline

        pipe = load_flow_pipeline(ZImagePipeline, path, cfg, dtype)
        if pipe.vae.config.get("force_upcast") and dtype == torch.float16:
            pipe.vae.to(torch.float32)  # FLUX's VAE, which Z-Image uses, overflows in fp16
        return cls(pipe, cfg.sample.sde_type, cfg.sample.resolution, cfg.pretrained.max_sequence_length)

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_name)

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.pipe.vae, self.pipe.text_encoder, self.pipe.transformer]

    def native_resolution(self) -> int:
        """The VAE's sample size (1024 for Z-Image, ZImagePipeline's default size): the transformer records none."""
        return self.pipe.vae.config.sample_size

    # -- conditioning and prediction -------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], resolution: int | None = None) -> dict[str, torch.Tensor]:
        """The pipeline's own encoding (its chat template, Qwen3's second-to-last hidden states, the real tokens
        only), padded with zeros to ``max_sequence_length`` tokens beside the mask of the real ones
        (``resolution``: unused)."""
        # a copy: ZImagePipeline writes the chat-templated prompts into the list it is given. The transformer's
        # device: an offloaded text encoder's (run.offload_text_encoders) is "meta"
        embeds = self.pipe.encode_prompt(
            list(prompts),
            device=self.pipe.transformer.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )[0]
        n, width = len(embeds), embeds[0].shape[-1]
        padded = embeds[0].new_zeros(n, self.max_sequence_length, width)
        mask = torch.zeros(n, self.max_sequence_length, dtype=torch.bool, device=padded.device)
        for i, e in enumerate(embeds):
            padded[i, : len(e)], mask[i, : len(e)] = e, True
        return {"prompt_embeds": padded, "prompt_mask": mask}

    @staticmethod
    def predict(
        model,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond: dict[str, torch.Tensor],
        negative: dict[str, torch.Tensor] | None,
        guidance_scale: float,
    ) -> torch.Tensor:
        """The velocity for (N, 16, h, w) latents, as ZImagePipeline's loop computes it: per-image latents and
        unpadded captions, timestep 1 - sigma, its guidance with g = ``guidance_scale`` - 1 (module docstring),
        its output negated."""
        n = latents.shape[0]
        timesteps = timesteps.expand(n) if timesteps.ndim == 0 else timesteps
        captions = unpadded(cond, n)
        guided = negative is not None and guidance_scale != 1
        if guided:  # [positives..., negatives...] in one call, as the pipeline batches them
            captions += unpadded(negative, n)
            latents, timesteps = latents.repeat(2, 1, 1, 1), timesteps.repeat(2)
        dtype = next(model.parameters()).dtype  # the pipeline's transformer.dtype (its first parameter's)
        out = model(
            list(latents.to(dtype).unsqueeze(2).unbind(dim=0)), (1000 - timesteps) / 1000, captions, return_dict=False
        )[0]
        out = torch.stack([o.float() for o in out]).squeeze(2)
        if guided:
            pos, neg = out[:n], out[n:]
            out = pos + (guidance_scale - 1) * (pos - neg)
        return -out

    # -- the latents ----------------------------------------------------------------------------------------
    def latent_size(self, resolution: int) -> int:
        """Latent rows (= columns) of a ``resolution`` px image, even for the 2x2 patches (ZImagePipeline's
        prepare_latents; it refuses sizes not a multiple of 16)."""
        return packed_latent_size(self.pipe.vae_scale_factor, resolution)

    def initial_latents(self, n: int, resolution: int, generator, device) -> torch.Tensor:
        """ZImagePipeline's noise: (n, 16, h, w) float32, the same numbers from the same generator."""
        if self.pipe.scheduler.config.get("use_dynamic_shifting"):
            check_resolution(resolution, self.resolution, "this Z-Image schedule")
        size = self.latent_size(resolution)
        return self.dynamics.prior((n, self.pipe.transformer.config.in_channels, size, size), generator, device)

    def save_lora(self, layers: dict[str, torch.Tensor], folder: Path) -> None:
        save_lora_layers(self.pipeline_class, self.denoiser_name, layers, folder)


def unpadded(cond: dict[str, torch.Tensor], n: int) -> list[torch.Tensor]:
    """The captions' real tokens, one (tokens, width) tensor each, for ``n`` images (a single caption, the
    negative prompt's, serves them all)."""
    embeds, mask = cond["prompt_embeds"], cond["prompt_mask"]
    captions = [e[m] for e, m in zip(embeds, mask)]
    return captions * n if len(captions) == 1 and n > 1 else captions
