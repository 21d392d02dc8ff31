"""The training objectives: the PPO-clip objective on per-step log-probabilities (DDPO: Black et al. 2023,
"Training Diffusion Models with Reinforcement Learning"; github.com/kvablack/ddpo-pytorch), Diffusion-DPO's,
DiffusionNFT's and AWM's, and the plain denoising error that DPO, its SFT and ReFL's pre-training step share."""

from __future__ import annotations

from typing import Any

import torch

from trainer.sampling import each_tensor


def ppo_clip_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    adv_clip_max: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Return the loss and detached stats (approx_kl, clipfrac, ratio) for one timestep of a batch."""
    advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = {
            "approx_kl": 0.5 * ((log_prob - old_log_prob) ** 2).mean(),
            "clipfrac": ((ratio - 1.0).abs() > clip_range).float().mean(),
            "ratio": ratio.mean(),
        }
    return loss, stats


def diffusion_dpo_loss(
    model_w: torch.Tensor,
    model_l: torch.Tensor,
    reference_w: torch.Tensor,
    reference_l: torch.Tensor,
    beta: float,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-DPO (Wallace et al. 2023, "Diffusion Model Alignment Using Direct Preference Optimization").

    Arguments are per-pair denoising errors, each the mean over channels and pixels of (prediction - target)^2
    for the winner (w) and loser (l) at the same noise and timestep, under the trained model and the frozen
    reference. The target is the noise for epsilon-prediction models and the velocity for flow matching (the
    same formula with the model's own target). The implicit reward margin is
    ``inside = -beta / 2 * ((model_w - model_l) - (reference_w - reference_l))``; the loss is
    ``-logsigmoid(inside)``, averaged (weighted by ``weights`` per pair when given: 0 leaves a pair out);
    implicit accuracy counts ``inside > 0`` (strictly).
    """
    inside = -0.5 * beta * ((model_w - model_l) - (reference_w - reference_l))
    losses = -torch.nn.functional.logsigmoid(inside)
    loss = losses.mean() if weights is None else (losses * weights).sum() / weights.sum().clamp(min=1)
    with torch.no_grad():
        stats = {
            "implicit_accuracy": (inside > 0).float().mean(),
            "reward_margin": inside.mean(),
            "model_mse_winner": model_w.mean(),
            "model_mse_loser": model_l.mean(),
            "reference_mse_winner": reference_w.mean(),
            "reference_mse_loser": reference_l.mean(),
        }
    return loss, stats


def nft_optimality(advantages: torch.Tensor, adv_clip_max: float) -> torch.Tensor:
    """DiffusionNFT's optimality probability r = clip(0.5 + 0.5 clip(A, -c, c) / c, 0, 1): 1 for the best
    samples, 0 for the worst, 0.5 carries no signal."""
    return (0.5 + 0.5 * advantages.clamp(-adv_clip_max, adv_clip_max) / adv_clip_max).clamp(0, 1)


def nft_loss(
    prediction: torch.Tensor,
    old_prediction: torch.Tensor,
    x0: torch.Tensor,
    to_x0,
    r: torch.Tensor,
    beta: float,
    adv_clip_max: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DiffusionNFT (Zheng et al. 2025, "DiffusionNFT: Online Diffusion Reinforcement with Forward Process"):
    the implicit positive and negative policies mix the trained prediction with the old policy's,

        pred+ = b pred + (1 - b) pred_old        pred- = (1 + b) pred_old - b pred

    each turned into clean latents by ``to_x0`` (the family's x0 of a prediction at the sample's x_t, affine in
    the prediction: x_t - t v for flow, (x_t - sqrt(1 - a) eps) / sqrt(a) for eps, so the mixing means the same
    for velocity, eps and v predictions). Per sample, the squared error to the rollout's clean latents ``x0``
    over its detached mean absolute error (>= 1e-5), then

        loss = c / b * mean[r l+ + (1 - r) l-]

    with c = ``adv_clip_max`` (their code's scale). ``old_prediction`` is a constant."""
    old_prediction = old_prediction.detach()
    dims = tuple(range(1, x0.ndim))

    def adaptive(mixed: torch.Tensor) -> torch.Tensor:
        error = to_x0(mixed) - x0
        with torch.no_grad():
            weight = error.double().abs().mean(dim=dims, keepdim=True).clamp(min=1e-5).to(error.dtype)
        return (error**2 / weight).mean(dim=dims)

    positive = adaptive(beta * prediction + (1 - beta) * old_prediction)
    negative = adaptive((1 + beta) * old_prediction - beta * prediction)
    per_sample = (r * positive + (1 - r) * negative) / beta
    loss = adv_clip_max * per_sample.mean()
    with torch.no_grad():
        stats = {
            "positive_loss": positive.mean(),
            "negative_loss": negative.mean(),
            "old_deviation": ((prediction - old_prediction) ** 2).mean(),
        }
    return loss, stats


def awm_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    time: torch.Tensor,
    advantages: torch.Tensor,
    adv_clip_max: float,
    power: float = 0.25,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Advantage Weighted Matching (Xue et al. 2025, "Advantage Weighted Matching: Aligning RL with
    Pretraining in Diffusion Models"): the pretraining loss l = mean((pred - target)^2) per sample, as the
    log-likelihood proxy log p = -t ((l + 1e-10)^p - 1e-10^p) / p, in a policy-gradient ratio that is 1
    on-policy, weighted by clamp(A, -c, c) / c: the gradient is A' t grad(l^p) / p, fitting the better
    samples and pushing away from the worse. The KL terms are the caller's."""
    dims = tuple(range(1, prediction.ndim))
    error = ((prediction - target) ** 2).mean(dim=dims)
    eps = 1e-10
    log_p = -time * ((error + eps) ** power - eps**power) / power
    weight = advantages.clamp(-adv_clip_max, adv_clip_max) / adv_clip_max
    loss = -(weight * torch.exp(log_p - log_p.detach())).mean()
    with torch.no_grad():
        stats = {"matching_loss": error.mean(), "log_p": log_p.mean()}
    return loss, stats


def denoising_errors(run, model, batch: dict[str, Any], resolution: int):
    """Each image's denoising MSE (the family's eps / v / velocity target) of ``batch["pixels"]`` (B, k, 3, R, R)
    in [0, 1], the k images of a row noised with the same noise at the same timestep; and the noised inputs
    (noisy, timesteps, cond, target) for the reference. SFT's loss and ReFL's pre-training step use k = 1."""
    family, device = run.family, run.accelerator.device
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
    with run.accelerator.autocast():
        prediction = family.predict(model, noisy, timesteps, cond, None, 1.0)
    error = ((prediction.float() - target.float()) ** 2).mean(dim=tuple(range(1, target.ndim)))
    return error, (noisy, timesteps, cond, target)
