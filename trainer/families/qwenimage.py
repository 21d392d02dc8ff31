"""The Qwen-Image family (Qwen/Qwen-Image; diffusers' QwenImagePipeline): a 20B MMDiT, QwenImageTransformer2DModel,
on the last hidden states of a Qwen2.5-VL-7B text encoder, sampled with Flow-GRPO's SDE step as SD3 and FLUX are
(trainer/families/flow.py; flow_grpo's scripts/train_qwenimage.py trains it with config/grpo.py
pickscore_qwenimage).

What differs from SD3 and FLUX, and where it lives here:

- The prompt is the pipeline's own encoding (``QwenImagePipeline.encode_prompt``): each prompt inside a fixed
  system template ("Describe the image by detailing the color, shape, ..."), the template's first 34 tokens
  dropped, the last hidden state of the rest, padded to the batch's longest with an attention mask. The mask
  travels with the embeddings ({"prompt_embeds", "prompt_embeds_mask"}) and always as a tensor (the pipeline
  drops an all-ones mask to None: ``predict`` does the same per call, so sampling equals the pipeline). At most
  ``pretrained.max_sequence_length`` tokens (the pipeline's default 512).
- Latents are (N, 16, h, w) in the trainer, as FLUX's; ``predict`` packs them into 2x2 patches of 64 channels
  (FluxPipeline's packing, the same as QwenImagePipeline's ``_pack_latents``), tells the transformer the grid
  (``img_shapes``: one frame of h/2 x w/2), and unpacks its output. The VAE (AutoencoderKLQwenImage) is a
  video VAE with a frame axis of 1 and per-channel latents_mean/latents_std: trainer/families/vae.py handles it.
- The schedule is shifted by image size as FLUX's (sigmas linspace(1, 1/N, N), mu linear in the packed tokens,
  the scheduler's exponential time shift, then its shift_terminal 0.02 stretch), so it is fixed for the run's
  resolution when the family loads (``sample.resolution``, default the pipeline's 1024 px).
- Guidance is the pipeline's "true CFG", NORM-RESCALED: with a negative prompt and a scale s > 1 (the
  pipeline's ``true_cfg_scale``, our ``sample.guidance_scale``), comb = neg + s (cond - neg), then
  comb x ||cond|| / ||comb||, the norms over the packed tokens' 64 channels. The cond and negative passes are two
  transformer calls, as the pipeline's (their text lengths differ). No negative, or s <= 1: the conditional
  prediction alone. The pipeline's ``guidance_scale`` (a transformer input of guidance-distilled variants,
  ``guidance_embeds``; Qwen-Image has none) is refused at load. Our negative prompt is the empty one, as for
  every family; flow_grpo's Qwen-Image runs use " " (a different embedding).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from trainer.families.flow import FlowMatching, check_resolution, load_flow_pipeline, packed_latent_size
from trainer.families.flux import pack, unpack
from trainer.families.sd1 import save_lora_layers
from trainer.families.vae import VAE

if TYPE_CHECKING:
    from trainer.config import Config

PIPELINE_TOKENS = 512  # QwenImagePipeline's default max_sequence_length (at most 1024)


class QwenImage:
    pipeline_class = "QwenImagePipeline"
    denoiser_name = "transformer"  # the pipeline component that is trained (and its folder when saved whole)
    shard_blocks = ("QwenImageTransformerBlock",)  # run.sharding's units: the MMDiT's double-stream blocks

    def __init__(
        self, pipe, sde_type: str = "sde", resolution: int | None = None, max_sequence_length: int | None = None
    ):
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length or PIPELINE_TOKENS
        # QwenImagePipeline's default size: its default_sample_size (128) latents of the VAE's x8
        self.resolution = resolution or pipe.default_sample_size * pipe.vae_scale_factor
        tokens = (self.latent_size(self.resolution) // 2) ** 2  # the 2x2-packed tokens the schedule is shifted for
        self.dynamics, self.vae = FlowMatching(pipe.scheduler, sde_type, tokens), VAE(pipe.vae)

    @classmethod
    def load(cls, path: str, cfg: Config, dtype: torch.dtype) -> "QwenImage":
        from diffusers import QwenImagePipeline

        if not cfg.pretrained.load_t5:  # before any weights load
            raise ValueError("pretrained.load_t5: false leaves SD3's T5 out; Qwen-Image has no T5 to leave out")
        pipe = load_flow_pipeline(QwenImagePipeline, path, cfg, dtype)
        if pipe.transformer.config.get("guidance_embeds"):
            raise ValueError(
                "pretrained.model: a guidance-distilled Qwen-Image (guidance_embeds) takes guidance as an input; "
                "only true CFG (sample.guidance_scale with a negative prompt) is supported"
            )
        return cls(pipe, cfg.sample.sde_type, cfg.sample.resolution, cfg.pretrained.max_sequence_length)

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_name)

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.pipe.vae, self.pipe.text_encoder, self.pipe.transformer]

    def native_resolution(self) -> int:
        """The size the schedule is shifted for: ``sample.resolution``, default the pipeline's 1024 px (neither the
        transformer's nor the VAE's config records one)."""
        return self.resolution

    # -- conditioning and prediction -------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], resolution: int | None = None) -> dict[str, torch.Tensor]:
        """The pipeline's own encoding: the template's last hidden states and their mask, (N, L, D) and (N, L),
        the mask kept even when all ones (``resolution``: unused)."""
        embeds, mask = self.pipe.encode_prompt(
            prompts, device=self.pipe.transformer.device, max_sequence_length=self.max_sequence_length
        )
        if mask is None:  # the pipeline's "no padding"
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}

    @staticmethod
    def predict(
        model,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond: dict[str, torch.Tensor],
        negative: dict[str, torch.Tensor] | None,
        guidance_scale: float,
    ) -> torch.Tensor:
        """The velocity for (N, 16, h, w) latents, as QwenImagePipeline calls the transformer: 2x2-packed tokens,
        timesteps / 1000, and its norm-rescaled true CFG when ``negative`` is given and the scale is above 1."""
        n, _, h, w = latents.shape
        timesteps = timesteps.expand(n) if timesteps.ndim == 0 else timesteps
        tokens, grid = pack(latents), [[(1, h // 2, w // 2)]] * n

        def call(c: dict[str, torch.Tensor]) -> torch.Tensor:
            mask = c["prompt_embeds_mask"]
            return model(
                hidden_states=tokens,
                timestep=timesteps / 1000,
                encoder_hidden_states=c["prompt_embeds"],
                encoder_hidden_states_mask=None if bool(mask.all()) else mask,  # as encode_prompt drops it
                img_shapes=grid,
                return_dict=False,
            )[0]

        velocity = call(cond)
        if negative is not None and guidance_scale > 1:
            uncond = call({k: v.expand(n, *v.shape[1:]) for k, v in negative.items()})
            combined = uncond + guidance_scale * (velocity - uncond)
            velocity = combined * (velocity.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))
        return unpack(velocity, h, w)

    # -- the latents ----------------------------------------------------------------------------------------
    def latent_size(self, resolution: int) -> int:
        """Latent rows (= columns) of a ``resolution`` px image, even for the 2x2 packing (as the pipeline rounds)."""
        return packed_latent_size(self.pipe.vae_scale_factor, resolution)

    def initial_latents(self, n: int, resolution: int, generator, device) -> torch.Tensor:
        """QwenImagePipeline's noise before it packs it: (n, 16, h, w), the same numbers from the same generator
        (it draws (n, 1, 16, h, w), the frame axis of 1 changing no number)."""
        check_resolution(resolution, self.resolution, "the Qwen-Image schedule")
        size = self.latent_size(resolution)
        return self.dynamics.prior((n, self.pipe.transformer.config.in_channels // 4, size, size), generator, device)

    def save_lora(self, layers: dict[str, torch.Tensor], folder: Path) -> None:
        save_lora_layers(self.pipeline_class, self.denoiser_name, layers, folder)
