"""The forward-process objectives: DiffusionNFT's (Zheng et al. 2025) and AWM's (Xue et al. 2025)."""

from __future__ import annotations

import torch


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
