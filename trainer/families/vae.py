"""Latents to images and back through a pipeline's VAE (diffusers' AutoencoderKL), the one piece every family
shares as it is: each family holds a ``VAE`` (``family.vae``) beside its ``dynamics``.

The latents the trainer handles are the VAE's scaled ones, z = (E(x) - shift) x scaling_factor, as the
diffusers pipelines make them: SD3's and FLUX's VAEs have a shift (0.0609, 0.1159), SD1's and SDXL's none. The
video-style VAEs (diffusers' AutoencoderKLQwenImage, Qwen-Image's) scale per channel instead, z = (E(x) - mean) /
std with their config's ``latents_mean`` and ``latents_std``, and take (N, C, frames, h, w): an image is one
frame, added here and dropped again, so the trainer's latents are (N, C, h, w) for every image family. A video
family's latents (Wan: AutoencoderKLWan, the same per-channel scaling) are (N, C, f, h, w) and decode to videos,
(N, 3, F, H, W) in [0, 1] and uint8 (N, F, H, W, 3), the layout trainer/rewards.py sends as videos.
"""

from __future__ import annotations

import numpy as np
import torch


class VAE:
    def __init__(self, autoencoder):
        self.autoencoder = autoencoder  # the pipeline's own module (upcast in place where fp16 overflows)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], (N, 3, H, W), or videos (N, 3, F, H, W) of video latents; float32; differentiable."""
        vae = self.autoencoder
        latents = latents.to(vae.dtype)
        if _per_channel(vae):  # as QwenImagePipeline and WanPipeline decode: z / (1 / std) + mean
            mean, inverse_std = _channel_stats(vae, latents)
            video = latents.ndim == 5  # an image goes through as the one frame
            unscaled = latents / inverse_std + mean
            images = vae.decode(unscaled if video else unscaled[:, :, None]).sample
            images = images if video else images[:, :, 0]
        else:
            images = vae.decode(latents / vae.config.scaling_factor + _shift(vae)).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def to_uint8(self, latents: torch.Tensor) -> np.ndarray:
        """Decoded uint8 NHWC numpy (videos: (N, F, H, W, 3)), made on the calling (main) thread: reward futures
        get numpy, never tensors (torch work handed to a helper thread competes with the training threads)."""
        return (self.decode(latents) * 255).round().to(torch.uint8).movedim(1, -1).cpu().numpy()

    def encode(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        """Latents of images in [0, 1], (N, 3, H, W), or of videos (N, 3, F, H, W) (for losses on real images:
        DPO, ReFL's pre-training)."""
        vae = self.autoencoder
        images = (images * 2 - 1).to(vae.dtype)
        if _per_channel(vae):  # as diffusers' Qwen-Image and Wan pipelines encode: (z - mean) x (1 / std)
            video = images.ndim == 5
            latents = vae.encode(images if video else images[:, :, None]).latent_dist.sample(generator)
            latents = latents if video else latents[:, :, 0]
            mean, inverse_std = _channel_stats(vae, latents)
            return (latents - mean) * inverse_std
        posterior = vae.encode(images).latent_dist
        return (posterior.sample(generator) - _shift(vae)) * vae.config.scaling_factor


def _shift(vae) -> float:
    """The VAE's latent shift: SD3's and FLUX's have one, SD1's and SDXL's none."""
    return vae.config.get("shift_factor") or 0.0


def _per_channel(vae) -> bool:
    """A video-style VAE scaled per channel (AutoencoderKLQwenImage): ``latents_mean``/``latents_std``, a frame axis."""
    return vae.config.get("latents_mean") is not None and vae.config.get("latents_std") is not None


def _channel_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel mean and 1 / std, (1, C, 1, ...) to broadcast against ``like``, in its dtype and device (as
    the pipelines make them)."""
    shape = (1, vae.config.z_dim, *[1] * (like.ndim - 2))
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(like.device, like.dtype)
    return mean, 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(like.device, like.dtype)
