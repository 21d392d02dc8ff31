"""The Wan text-to-video family (Wan-AI's Wan2.1 and Wan2.2 T2V; diffusers' WanPipeline): a flow-matching video
transformer, WanTransformer3DModel, on UMT5-XXL's tokens, sampled with Flow-GRPO's SDE step as SD3 is
(trainer/families/flow.py; flow_grpo trains Wan2.1 the same way, github.com/yifan123/flow_grpo,
scripts/train_wan2_1.py with config/grpo.py general_ocr_wan2_1).

What differs from SD3 and FLUX, and where it lives here:

- Latents are VIDEO latents, (N, 16, f, h, w): f = (F - 1) / 4 + 1 latent frames of F video frames (the VAE,
  AutoencoderKLWan, is causal in time: x4 after the first frame, x8 in space), h, w = H / 8, W / 8. The transformer
  takes them as they are (it patchifies (1, 2, 2) itself), so nothing is packed here. The shared engine reduces over
  every non-batch dimension, and ``family.vae`` (trainer/families/vae.py) decodes them to videos (N, 3, F, H, W),
  uint8 (N, F, H, W, 3) for the rewards (image scorers pool their frame scores per video, scorers/video.py). F is
  ``sample.num_frames`` (default the pipeline's 81), H ``sample.resolution`` (default the pipeline's 480) and W
  ``sample.width`` (default H: WanPipeline's 480 x 832 is ``--sample.resolution 480 --sample.width 832``); H and W
  multiples of 16, as the pipeline requires.
- The prompt is the pipeline's own encoding (``WanPipeline.encode_prompt``): the text cleaned (ftfy when installed,
  HTML unescaped, whitespace collapsed), UMT5's last hidden state of its real tokens, zero-padded to
  ``pretrained.max_sequence_length`` (default the pipeline's 512). No pooled embedding, no mask.
- The schedule: the real checkpoints ship a UniPCMultistepScheduler (a multistep solver on flow sigmas shifted by
  ``flow_shift``: 3.0 at 480p, 5.0 at 720p). The SDE step and its log-prob model one Euler step of a
  FlowMatchEulerDiscreteScheduler, so loading replaces UniPC by FlowMatchEulerDiscreteScheduler(shift=flow_shift),
  as flow_grpo's and Flow-Factory's Wan trainers sample with their own flow SDE/Euler step. The shift is the same,
  the grid is Euler's: shift(linspace(1, shift(1/1000), n)) then 0, where UniPC's are shift(linspace(1, 1/n, n))
  (at 10 steps, shift 3: Euler's last nonzero sigma 0.0089, UniPC's 0.252, which its multistep solver jumps from).
  A deterministic evaluation is the Euler ODE, not the pipeline's default UniPC sampling. A pipeline saved with a
  FlowMatchEulerDiscreteScheduler (the tiny one) keeps it.
- Guidance is the pipeline's classifier-free guidance, two passes, conditional first: uncond + w (cond - uncond)
  for w = ``sample.guidance_scale`` > 1 (the pipeline's ``do_classifier_free_guidance``); w <= 1 or no negative is
  the conditional prediction alone. No guidance input, no rescaling.
- Wan2.2-A14B's two experts (``transformer_2``, ``boundary_ratio`` in model_index.json: 0.875): timesteps t >=
  boundary_ratio x 1000 go to ``transformer`` (high noise), the others to ``transformer_2`` (low noise) with
  ``sample.guidance_scale_2`` (default ``sample.guidance_scale``, as the pipeline), per sample.
  ``pretrained.train_experts`` says which train: ``high`` (the default) or ``low`` (the trainer's model is that
  expert, the other runs frozen), or ``both``, Flow-Factory's default (LoRA only: the trainer's model is
  ``Experts``, the two transformers as one module, each sample routed to its own). The saved files say which
  expert each LoRA is for: the high-noise one's is the usual ``pytorch_lora_weights.safetensors``, the low-noise
  one's ``LOW_LORA``, which loads with ``WanPipeline.load_lora_weights(folder, weight_name=LOW_LORA,
  load_into_transformer_2=True)``; ``Wan.load_lora`` loads whichever a folder holds.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from trainer.families.flow import FlowMatching
from trainer.families.sd1 import dtype_kwarg
from trainer.families.vae import VAE

if TYPE_CHECKING:
    from trainer.config import Config

PIPELINE_TOKENS = 512  # WanPipeline.__call__'s default max_sequence_length
PIPELINE_FRAMES = 81  # WanPipeline's default num_frames
PIPELINE_HEIGHT = 480  # WanPipeline's default height (its width: 832)
EXPERTS = {"high": "transformer", "low": "transformer_2"}  # pretrained.train_experts -> the trained component
HIGH_LORA = "pytorch_lora_weights.safetensors"  # diffusers' default name: the (high-noise) transformer's LoRA
LOW_LORA = "pytorch_lora_weights_transformer_2.safetensors"  # the low-noise expert's LoRA


class Wan:
    pipeline_class = "WanPipeline"
    denoiser_name = "transformer"  # the trained component; "transformer_2" when training Wan2.2's low-noise expert
    shard_blocks = ("WanTransformerBlock",)  # run.sharding's units: the transformer's blocks
    # the settings only a video (or two-expert) family takes: trainer/families/models.py refuses them elsewhere
    settings = ("sample.num_frames", "sample.width", "sample.guidance_scale_2", "pretrained.train_experts")

    def __init__(
        self,
        pipe,
        sde_type: str = "sde",
        num_frames: int | None = None,
        width: int | None = None,
        max_sequence_length: int | None = None,
        guidance_scale_2: float | None = None,
        train_experts: str | None = None,
    ):
        self.pipe, self.width, self.guidance_scale_2 = pipe, width, guidance_scale_2
        self.num_frames = num_frames or PIPELINE_FRAMES
        self.max_sequence_length = max_sequence_length or PIPELINE_TOKENS
        ratio = pipe.config.get("boundary_ratio")
        self.boundary = None if ratio is None else ratio * pipe.scheduler.config.num_train_timesteps
        if (train_experts or guidance_scale_2) and (self.boundary is None or pipe.transformer_2 is None):
            raise ValueError(
                "pretrained.train_experts / sample.guidance_scale_2: this Wan pipeline has one transformer "
                "(Wan2.2-A14B's two experts need transformer_2 and boundary_ratio)"
            )
        self.both = train_experts == "both"
        self.experts = Experts(pipe.transformer, pipe.transformer_2) if self.both else None
        self.denoiser_name = "transformer" if self.both else EXPERTS[train_experts or "high"]
        if (self.num_frames - 1) % pipe.vae_scale_factor_temporal:
            raise ValueError(
                f"sample.num_frames: {self.num_frames} frames; Wan's VAE takes 1 + {pipe.vae_scale_factor_temporal} k"
            )
        self.dynamics, self.vae = FlowMatching(pipe.scheduler, sde_type), VAE(pipe.vae)

    @classmethod
    def load(cls, path: str, cfg: Config, dtype: torch.dtype) -> "Wan":
        from diffusers import WanPipeline

        if not cfg.pretrained.load_t5:  # before any weights load
            raise ValueError("pretrained.load_t5: false leaves SD3's T5 out; Wan's prompt tokens are UMT5's")
        if cfg.pretrained.train_experts == "both" and not cfg.train.lora:
            raise ValueError("pretrained.train_experts: both experts train as LoRA only (train.lora true)")
        pipe = WanPipeline.from_pretrained(path, revision=cfg.pretrained.revision, **dtype_kwarg(dtype))
        if pipe.config.get("expand_timesteps"):  # Wan2.2-TI2V-5B: a timestep per latent token, not per video
            raise ValueError(
                "pretrained.model: Wan2.2-TI2V-5B's per-token timesteps (expand_timesteps) are not supported"
            )
        pipe.scheduler = flow_euler(pipe.scheduler)
        pipe.set_progress_bar_config(disable=True)
        s = cfg.sample
        return cls(
            pipe,
            s.sde_type,
            s.num_frames,
            s.width,
            cfg.pretrained.max_sequence_length,
            s.guidance_scale_2,
            cfg.pretrained.train_experts,
        )

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.experts if self.both else getattr(self.pipe, self.denoiser_name)

    def frozen_modules(self) -> list[torch.nn.Module]:
        pipe = self.pipe
        return [m for m in (pipe.vae, pipe.text_encoder, pipe.transformer, pipe.transformer_2) if m is not None]

    def native_resolution(self) -> int:
        """WanPipeline's default height, 480 px (its default width, 832, is ``sample.width``'s to set)."""
        return PIPELINE_HEIGHT

    # -- conditioning and prediction -------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], resolution: int | None = None) -> dict[str, torch.Tensor]:
        """The pipeline's own encoding: UMT5's last hidden states of the cleaned prompt, zero-padded to
        ``max_sequence_length`` tokens, (N, L, D) (``resolution``: unused)."""
        embeds, _ = self.pipe.encode_prompt(
            prompts,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
            device=self.pipe.transformer.device,  # where it runs: an offloaded encoder's device is meta
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
        """The velocity for (N, 16, f, h, w) latents, as WanPipeline calls its transformer: the latents as they are,
        the timesteps t (0 to 1000), CFG in two passes above scale 1; with two experts, each sample to its expert by
        its t (``model`` is the trained one, the other runs frozen; with both trained, ``Experts``), the low-noise
        one at ``guidance_scale_2``."""
        n = latents.shape[0]
        timesteps = timesteps.expand(n) if timesteps.ndim == 0 else timesteps
        if self.boundary is None:
            return guided_twice(model, latents, timesteps, cond, negative, guidance_scale)
        high = timesteps >= self.boundary
        low_scale = guidance_scale if self.guidance_scale_2 is None or negative is None else self.guidance_scale_2
        experts = {"transformer": self.pipe.transformer, "transformer_2": self.pipe.transformer_2}
        if self.both:  # through the trained module itself, so DDP, FSDP and compile see each call
            experts = {name: functools.partial(model, expert=name) for name in experts}
        else:
            experts[self.denoiser_name] = model
        if bool(high.all()) or not bool(high.any()):  # one expert for the whole batch (always, when sampling)
            expert, scale = ("transformer", guidance_scale) if bool(high[0]) else ("transformer_2", low_scale)
            return guided_twice(experts[expert], latents, timesteps, cond, negative, scale)
        velocity = torch.empty_like(latents)
        for rows, expert, scale in ((high, "transformer", guidance_scale), (~high, "transformer_2", low_scale)):
            part = {k: v[rows] if v.shape[0] == n else v for k, v in cond.items()}
            velocity[rows] = guided_twice(experts[expert], latents[rows], timesteps[rows], part, negative, scale).to(
                velocity.dtype
            )
        return velocity

    # -- the latents ----------------------------------------------------------------------------------------
    def initial_latents(self, n: int, resolution: int, generator, device) -> torch.Tensor:
        """WanPipeline's noise from the same generator: (n, 16, (F - 1) / 4 + 1, H / 8, W / 8) in float32, H the
        ``resolution`` and W ``sample.width`` (default H)."""
        height, width = resolution, self.width or resolution
        if height % 16 or width % 16:
            raise ValueError(f"sample.resolution / sample.width: {height} x {width}; Wan takes multiples of 16")
        pipe, channels = self.pipe, self.denoiser.config.in_channels
        frames = (self.num_frames - 1) // pipe.vae_scale_factor_temporal + 1
        scale = pipe.vae_scale_factor_spatial
        return self.dynamics.prior((n, channels, frames, height // scale, width // scale), generator, device)

    def save_lora(self, layers: dict[str, torch.Tensor], folder: Path) -> None:
        """Each trained expert's LoRA in its own file (HIGH_LORA, LOW_LORA), a "transformer" LoRA either way."""
        from diffusers import WanPipeline

        if self.both:  # Experts' keys start with the expert's name
            parts = {
                name: {k.removeprefix(f"{name}."): v for k, v in layers.items() if k.startswith(f"{name}.")}
                for name in ("transformer", "transformer_2")
            }
        else:
            parts = {self.denoiser_name: layers}
        for name, mine in parts.items():
            weight_name = LOW_LORA if name == "transformer_2" else HIGH_LORA
            WanPipeline.save_lora_weights(folder, transformer_lora_layers=mine, weight_name=weight_name)

    def load_lora(self, folder: Path) -> None:
        """A run's ``lora/`` into the pipeline: HIGH_LORA into ``transformer``, LOW_LORA into ``transformer_2``
        (WanPipeline's ``load_into_transformer_2``), whichever the folder holds."""
        folder = Path(folder)
        if (folder / HIGH_LORA).is_file():
            self.pipe.load_lora_weights(folder, weight_name=HIGH_LORA)
        if (folder / LOW_LORA).is_file():
            if self.pipe.transformer_2 is None:
                raise ValueError(
                    f"{folder / LOW_LORA}: a low-noise expert's LoRA; this Wan pipeline has one transformer"
                )
            self.pipe.load_lora_weights(folder, weight_name=LOW_LORA, load_into_transformer_2=True)


class Experts(torch.nn.Module):
    """Wan2.2's two experts trained together (``pretrained.train_experts both``), as one module: ``forward(...,
    expert=name)`` calls that transformer, so a distributed wrapper's hooks see every call, and the adapter
    methods the trainer calls act on both. Its LoRA state dict's keys start with ``transformer.`` or
    ``transformer_2.``, which ``Wan.save_lora`` splits into the two files."""

    def __init__(self, transformer, transformer_2):
        super().__init__()
        self.transformer, self.transformer_2 = transformer, transformer_2

    def forward(self, *args, expert: str, **kwargs):
        return getattr(self, expert)(*args, **kwargs)

    @property
    def config(self):  # the experts share their shapes
        return self.transformer.config

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    def add_adapter(self, config) -> None:
        for expert in (self.transformer, self.transformer_2):
            expert.add_adapter(config)
        self.peft_config = self.transformer.peft_config  # what peft's get_peft_model_state_dict reads

    def disable_adapters(self) -> None:
        self.transformer.disable_adapters()
        self.transformer_2.disable_adapters()

    def enable_adapters(self) -> None:
        self.transformer.enable_adapters()
        self.transformer_2.enable_adapters()

    def enable_gradient_checkpointing(self) -> None:
        self.transformer.enable_gradient_checkpointing()
        self.transformer_2.enable_gradient_checkpointing()


def guided_twice(model, latents, timesteps, cond, negative, guidance_scale: float) -> torch.Tensor:
    """WanPipeline's CFG: the conditional pass, then (above scale 1, with a negative) the unconditional one on the
    negative prompt (one prompt's embeddings, for all), uncond + w (cond - uncond)."""
    n = latents.shape[0]

    def call(embeds: torch.Tensor) -> torch.Tensor:
        return model(
            hidden_states=latents,
            timestep=timesteps,
            encoder_hidden_states=embeds.expand(n, -1, -1),
            return_dict=False,
        )[0]

    velocity = call(cond["prompt_embeds"])
    if negative is not None and guidance_scale > 1:
        uncond = call(negative["prompt_embeds"])
        velocity = uncond + guidance_scale * (velocity - uncond)
    return velocity


def flow_euler(scheduler):
    """The scheduler the flow SDE step models: a FlowMatchEulerDiscreteScheduler as it is; Wan's
    UniPCMultistepScheduler on flow sigmas (use_flow_sigmas) replaced by FlowMatchEulerDiscreteScheduler with its
    flow_shift (Euler's grid of sigmas, not UniPC's: module docstring); anything else refused."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        if scheduler.config.get("use_dynamic_shifting"):
            raise ValueError("pretrained.model: its scheduler shifts sigmas by resolution; Wan's shift is fixed")
        return scheduler
    config = scheduler.config
    if isinstance(scheduler, UniPCMultistepScheduler) and config.get("use_flow_sigmas"):
        return FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=config.num_train_timesteps, shift=config.get("flow_shift") or 1.0
        )
    raise ValueError(
        f"pretrained.model: the SDE step models flow-matching sigmas; a {type(scheduler).__name__} "
        f"(without use_flow_sigmas) has none"
    )
