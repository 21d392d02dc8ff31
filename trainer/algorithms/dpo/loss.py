"""Diffusion-DPO's objective (Wallace et al. 2023)."""

from __future__ import annotations

import torch


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
