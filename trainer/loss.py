"""The losses the algorithms share: the plain denoising error that Diffusion-DPO, its SFT and ReFL's pre-training
step use, and NormGuard's hinge on the velocity's norm. Each algorithm's own objective is in its folder
(trainer/algorithms/<name>/loss.py)."""

from __future__ import annotations

from typing import Any

import torch

from trainer.sampling import each_tensor


def denoising_errors(accelerator, family, model, batch: dict[str, Any], resolution: int, reference=None):
    """Each image's denoising MSE (the family's eps / v / velocity target) of ``batch["pixels"]`` (B, k, 3, R, R)
    in [0, 1], the k images of a row noised with the same noise at the same timestep; and, with ``reference``
    (a no-gradient ``predict(family, noisy, timesteps, cond)``, e.g. Diffusion-DPO's reference model), its
    errors on the same inputs, else None. The reference predicts first: weights swapped into the model for it
    must not be what the model's own forward saved for its backward. SFT's loss and ReFL's pre-training step
    use k = 1."""
    device = accelerator.device
    pixels = batch["pixels"].to(device, non_blocking=True)
    n, k = pixels.shape[:2]
    with torch.no_grad():
        latents = family.vae.encode(pixels.flatten(0, 1)).float()  # (k B, ...): row by row
        cond = family.encode_prompts(batch["captions"], resolution)
        if isinstance(cond, dict) and "time_ids" in cond:  # SDXL: the images' own original sizes and crops
            cond["time_ids"] = batch["time_ids"].to(cond["time_ids"])
        if k > 1:
            cond = each_tensor(cond, lambda t: t.repeat_interleave(k, dim=0))
    noise = torch.randn_like(latents[::k]).repeat_interleave(k, dim=0)
    u = torch.rand(n, device=device).repeat_interleave(k)
    noisy, timesteps, target = family.dynamics.noised(latents, noise, u)
    dims = tuple(range(1, target.ndim))
    reference_error = None
    if reference is not None:
        with torch.no_grad(), accelerator.autocast():
            reference_error = ((reference(family, noisy, timesteps, cond).float() - target.float()) ** 2).mean(dims)
    with accelerator.autocast():
        prediction = family.predict(model, noisy, timesteps, cond, None, 1.0)
    return ((prediction.float() - target.float()) ** 2).mean(dim=dims), reference_error


def rms(prediction: torch.Tensor) -> torch.Tensor:
    """Each sample's root-mean-square over its elements: a norm that does not grow with the resolution."""
    return prediction.float().pow(2).mean(dim=tuple(range(1, prediction.ndim))).sqrt()


def norm_hinge(prediction: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """NormGuard (arXiv 2606.27771): RL finetuning inflates the velocity's norm over the base model's on the same
    inputs, and only a penalty in training undoes it: mean over samples of max(0, ||v_policy|| - ||v_base||),
    zero while the policy's norm stays at or below the base's. The paper's exact form is not published; ours
    is per sample with ``rms`` norms, unsquared. Returns it and the mean norm ratio (logged)."""
    policy, base = rms(prediction), rms(reference.detach())
    hinge = torch.relu(policy - base).mean()
    return hinge, {"norm_hinge": hinge.detach(), "norm_ratio": (policy / base.clamp(min=1e-12)).mean().detach()}
