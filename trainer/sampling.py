"""Sampling with log-probabilities: the DDIM trajectory of each image, kept for the PPO update.

``guided_noise`` is the single UNet forward used both here and in training, so both see the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from trainer.ddim import ddim_mean_std, ddim_step_with_logprob, gaussian_log_prob


@dataclass
class Trajectories:
    """A batch of sampled images with everything the update needs; tensors are (N, ...) on one device."""

    prompt_embeds: torch.Tensor  # (N, L, D)
    latents: torch.Tensor  # (N, T, C, h, w): x_t fed to step j
    next_latents: torch.Tensor  # (N, T, C, h, w): x_{t-1} drawn at step j
    log_probs: torch.Tensor  # (N, T)
    timesteps: torch.Tensor  # (N, T)
    prompts: list[str] = field(default_factory=list)
    metadata: list[dict[str, Any]] = field(default_factory=list)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}

    def shuffled(self, advantages: torch.Tensor, batch_size: int, num_timesteps: int):
        """Yield (chunk, advantages) in random sample order, each sample with its own random timesteps.

        Only the first ``num_timesteps`` of each sample's permutation are kept (timestep_fraction).
        """
        n, total = advantages.shape[0], self.timesteps.shape[1]
        order = torch.randperm(n, device=advantages.device)
        steps = torch.stack([torch.randperm(total, device=advantages.device)[:num_timesteps] for _ in range(n)])
        per_step = {"latents", "next_latents", "log_probs", "timesteps"}
        tensors = {k: v[order[:, None], steps] if k in per_step else v[order] for k, v in self.tensors().items()}
        advantages = advantages[order]
        for start in range(0, n, batch_size):
            part = {k: v[start : start + batch_size] for k, v in tensors.items()}
            yield Trajectories(**part), advantages[start : start + batch_size]

    @classmethod
    def cat(cls, parts: list["Trajectories"]) -> "Trajectories":
        tensors = {k: torch.cat([p.tensors()[k] for p in parts]) for k in parts[0].tensors()}
        return cls(**tensors, prompts=sum((p.prompts for p in parts), []), metadata=sum((p.metadata for p in parts), []))


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    tokens = pipe.tokenizer(
        prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    return pipe.text_encoder(tokens.input_ids.to(pipe.text_encoder.device))[0]


def guided_noise(
    unet,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor | None,
    guidance_scale: float,
) -> torch.Tensor:
    """The model's prediction, with classifier-free guidance when ``negative_embeds`` is given."""
    timesteps = timesteps.expand(latents.shape[0]) if timesteps.ndim == 0 else timesteps
    if negative_embeds is None:
        return unet(latents, timesteps, prompt_embeds).sample
    both = unet(
        torch.cat([latents, latents]),
        torch.cat([timesteps, timesteps]),
        torch.cat([negative_embeds.expand_as(prompt_embeds), prompt_embeds]),
    ).sample
    uncond, cond = both.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


@torch.no_grad()
def sample(
    pipe,
    unet,
    prompts: list[str],
    metadata: list[dict[str, Any]],
    negative_embeds: torch.Tensor,
    num_steps: int,
    eta: float,
    guidance_scale: float,
    resolution: int,
    generator: torch.Generator | None = None,
) -> tuple[Trajectories, torch.Tensor]:
    """Run DDIM from noise; return the trajectories and the final latents (decode them with ``to_uint8``)."""
    device = negative_embeds.device
    prompt_embeds = encode_prompts(pipe, prompts)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(num_steps, device=device)
    size = resolution // pipe.vae_scale_factor
    x = torch.randn(
        (len(prompts), unet.config.in_channels, size, size), generator=generator, device=device, dtype=torch.float32
    ) * scheduler.init_noise_sigma

    latents, next_latents, log_probs = [], [], []
    for t in scheduler.timesteps:
        noise = guided_noise(unet, x, t, prompt_embeds, negative_embeds, guidance_scale)
        x_prev, log_prob = ddim_step_with_logprob(scheduler, noise, t, x, eta, generator=generator)
        latents.append(x)
        next_latents.append(x_prev)
        log_probs.append(log_prob)
        x = x_prev

    trajectories = Trajectories(
        prompt_embeds=prompt_embeds,
        latents=torch.stack(latents, dim=1),
        next_latents=torch.stack(next_latents, dim=1),
        log_probs=torch.stack(log_probs, dim=1),
        timesteps=scheduler.timesteps.repeat(len(prompts), 1),
        prompts=list(prompts),
        metadata=list(metadata),
    )
    return trajectories, x


def rescore(
    unet,
    scheduler,
    chunk: Trajectories,
    j: int,
    negative_embeds: torch.Tensor | None,
    guidance_scale: float,
    eta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-prob under ``unet`` of the stored step ``j`` of each trajectory in ``chunk``, with the step's
    Gaussian mean and sigma (for a KL to a reference policy)."""
    timesteps, latents = chunk.timesteps[:, j], chunk.latents[:, j]
    noise = guided_noise(unet, latents, timesteps, chunk.prompt_embeds, negative_embeds, guidance_scale)
    mean, sigma = ddim_mean_std(scheduler, noise, timesteps, latents, eta)
    return gaussian_log_prob(chunk.next_latents[:, j], mean, sigma), mean, sigma


@torch.no_grad()
def to_uint8(vae, latents: torch.Tensor) -> np.ndarray:
    """Decode latents to uint8 NHWC numpy on the calling (main) thread.

    Reward futures get numpy, never tensors: torch work in a helper thread slows the main thread's torch
    for the rest of the process (ANCHORS section 9).
    """
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    images = (images.float() / 2 + 0.5).clamp(0, 1)
    return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
