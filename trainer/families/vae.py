"""Latents to images and back through a pipeline's VAE (diffusers' AutoencoderKL), the one piece every family
shares as it is: each family holds a ``VAE`` (``family.vae``) beside its ``dynamics``.

The latents the trainer handles are the VAE's scaled ones, z = (E(x) - shift) x scaling_factor, as the
diffusers pipelines make them: SD3's and FLUX's VAEs have a shift (0.0609, 0.1159), SD1's and SDXL's none.
"""

from __future__ import annotations

import numpy as np
import torch


class VAE:
    def __init__(self, autoencoder):
        self.autoencoder = autoencoder  # the pipeline's own module (upcast in place where fp16 overflows)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], (N, 3, H, W), float32; differentiable."""
        vae = self.autoencoder
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + _shift(vae)).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def to_uint8(self, latents: torch.Tensor) -> np.ndarray:
        """Decoded uint8 NHWC numpy, made on the calling (main) thread: reward futures get numpy, never
        tensors (torch work handed to a helper thread competes with the training threads)."""
        return (self.decode(latents) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    def encode(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        """Latents of images in [0, 1], (N, 3, H, W) (for losses on real images: DPO, ReFL's pre-training)."""
        vae = self.autoencoder
        posterior = vae.encode((images * 2 - 1).to(vae.dtype)).latent_dist
        return (posterior.sample(generator) - _shift(vae)) * vae.config.scaling_factor


def _shift(vae) -> float:
    """The VAE's latent shift: SD3's and FLUX's have one, SD1's and SDXL's none."""
    return vae.config.get("shift_factor") or 0.0
