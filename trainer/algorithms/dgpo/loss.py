"""DGPO's objective (Luo et al. 2025, "Reinforcing Diffusion Models by Direct Group Preference Optimization",
arXiv 2510.08425), on per-sample denoising errors."""

from __future__ import annotations

import torch


def denoising_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """dsm per sample: the mean over its elements of (target - prediction)^2 (float32)."""
    return ((prediction.float() - target.float()) ** 2).mean(dim=tuple(range(1, prediction.ndim)))


def group_weights(
    dsm: torch.Tensor, ref: torch.Tensor, advantages: torch.Tensor, group_size: int, beta_dpo: float
) -> torch.Tensor:
    """w_g = sigmoid(s_g), s_g = sum_{i in g} A_i beta_dpo (dsm_i - ref_i) / G, a constant, broadcast to each
    row of its group. ``dsm`` and ``ref`` are (B, k): B samples (groups of ``group_size`` contiguous rows) at k
    steps, each step its own weight; ``advantages`` (B,)."""
    with torch.no_grad():
        terms = advantages[:, None] * beta_dpo * (dsm - ref) / group_size
        s = terms.reshape(-1, group_size, terms.shape[1]).sum(dim=1)
        return torch.sigmoid(s).repeat_interleave(group_size, dim=0)


def clip_mask(dsm: torch.Tensor, old_dsm: torch.Tensor, advantages: torch.Tensor, clip: float) -> torch.Tensor:
    """DGPO's PPO-style clip on dsm: ratio = exp(old_dsm - dsm) (above 1 where the policy fits the sample
    better than the EMA old model); masked where a positive sample is already fitted past 1 + c, or a
    non-positive one already pushed away past 1 - c."""
    with torch.no_grad():
        ratio = torch.exp(old_dsm - dsm)
        a = advantages[:, None]
        return ((ratio > 1 + clip) & (a > 0)) | ((ratio < 1 - clip) & (a <= 0))


def kl_to_base(prediction: torch.Tensor, base: torch.Tensor, masked: torch.Tensor | None = None) -> torch.Tensor:
    """train.kl_coef's KL, the mean of (v_theta - v_ref)^2 over B x k rows (``prediction`` and ``base`` (B k, ...),
    each sample's k steps contiguous). ``masked`` (B, k): DGPO's option to apply the clip's mask to the KL as
    well, so a masked row's KL gives no gradient (its value still counts, as a masked dsm's does)."""
    if masked is None:
        return ((prediction - base) ** 2).mean()
    per_row = ((prediction - base) ** 2).reshape(*masked.shape, -1).mean(dim=-1)
    return torch.where(masked, per_row.detach(), per_row).mean()


def dgpo_loss(
    dsm: torch.Tensor,
    ref: torch.Tensor,
    old_dsm: torch.Tensor | None,
    advantages: torch.Tensor,
    group_size: int,
    beta_dpo: float,
    clip: float,
    adv_clip_max: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DGPO's loss on B samples (groups of ``group_size`` contiguous rows) at k steps each: ``dsm`` (B, k) the
    policy's denoising errors (with gradient), ``ref`` (B, k) the reference's, ``old_dsm`` (B, k) the EMA old
    model's (None: no clip), ``advantages`` (B,) clipped here to [-adv_clip_max, adv_clip_max]:

        L = mean_{i, j} w_g(i),j A_i dsm_ij,   w_g,j = sigmoid(beta_dpo sum_{i in g} A_i (dsm_ij - ref_ij) / G)

    with w a constant and, where ``clip`` masks (clip_mask), dsm_ij a constant. Sign: the gradient is
    mean(w A grad dsm), so a descent step lowers dsm (fits) the samples with A > 0 and raises it on those with
    A < 0. It is the gradient of the group DPO loss -log sigmoid(-s_g) (the paper's group preference: the
    policy's likelihood ratio to the reference, log p - log p_ref ~ -(dsm - ref), weighted by A), up to the
    factor beta_dpo / G: d(-log sigmoid(-s)) = sigmoid(s) ds. w_g is near 1 where the policy still fits the
    group's good samples worse than the reference does (s_g > 0), near 0 where it has learnt the preference."""
    advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    weights = group_weights(dsm.detach(), ref, advantages, group_size, beta_dpo)
    masked = torch.zeros_like(dsm, dtype=torch.bool)
    if old_dsm is not None and clip > 0:
        masked = clip_mask(dsm.detach(), old_dsm, advantages, clip)
    trained = torch.where(masked, dsm.detach(), dsm)
    loss = (weights * advantages[:, None] * trained).mean()
    with torch.no_grad():
        stats = {
            "dsm": dsm.mean(),
            "dsm_minus_ref": (dsm - ref).mean(),
            "group_weight": weights.mean(),
            "clip_fraction": masked.float().mean(),
        }
    return loss, stats
