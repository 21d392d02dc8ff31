"""The ``nft`` (DiffusionNFT) and ``awm`` (AWM) settings groups, part of trainer.config.Config."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from trainer.groups import _Group


class NFTConfig(_Group):
    """DiffusionNFT (``--algorithm nft``; Zheng et al. 2025, github.com/NVlabs/DiffusionNFT): rollouts at
    sample.eta (0: the family's deterministic sampler) keep only clean latents and rewards; training is the
    denoising loss on them, re-noised at train.timestep_fraction of the sampler's own steps, pulled toward the
    better samples and away from the worse through an old policy. The KL to the base model is train.kl_coef
    (DiffusionNFT's config.train.beta, 1e-4: mean squared difference of the predictions)."""

    # Named beta as in DiffusionNFT (Zheng et al. 2025, its config.beta), so that its recipes port unchanged; a
    # mixing coefficient, unlike dpo.beta (a KL weight). DiffusionNFT's KL weight (its config.train.beta) is ours
    # train.kl_coef.
    beta: float = Field(
        1.0,
        gt=0,
        description="the mixing strength b of the implicit positive and negative "
        "policies (DiffusionNFT's config.beta: 1.0; 0.1 for OCR and several rewards); not a KL",
    )
    old_decay_rate: float = Field(
        0.001,
        ge=0,
        description="the old policy moves toward the current weights once "
        "per epoch, old <- d old + (1 - d) current, d = min(rate x optimizer steps, "
        "old_decay_max) (DiffusionNFT: 0.001)",
    )
    old_decay_max: float = Field(0.5, ge=0, lt=1, description="the old policy's largest decay d (DiffusionNFT: 0.5)")
    old_decay_flat_steps: int = Field(
        0,
        ge=0,
        description="optimizer steps before the decay starts to grow, d = 0 "
        "until then (DiffusionNFT's OCR schedule: 75, rate 0.0075, max 0.999)",
    )
    rollout_policy: Literal["old", "current"] = Field(
        "old",
        description="which weights sample each epoch's images: old, the lagging old policy (DiffusionNFT samples "
        "with its old adapter); current, the weights being trained. The same while the decay is 0",
    )

    def old_decay(self, step: int) -> float:
        """DiffusionNFT's return_decay: 0 for the flat steps, then rising by old_decay_rate per step."""
        return (
            0.0
            if step < self.old_decay_flat_steps
            else min((step - self.old_decay_flat_steps) * self.old_decay_rate, self.old_decay_max)
        )


class AWMConfig(_Group):
    """Advantage Weighted Matching (``--algorithm awm``; Xue et al. 2025, github.com/scxue/advantage_weighted_matching):
    rollouts and training steps as DiffusionNFT's; the loss is the pretraining loss on the clean latents
    weighted by the clipped advantage, with two KL terms: train.kl_coef to the base model (AWM's beta: 0.001
    GenEval, 0.003 OCR, 1e-4 PickScore) and awm.ema_kl_coef to a lagging average of the policy."""

    power: float = Field(0.25, gt=0, description="p of the log-likelihood proxy -t ((l + 1e-10)^p - 1e-10^p) / p")
    ema_kl_coef: float = Field(
        1.0,
        ge=0,
        description="weight of mean((pred - pred_ema)^2), the KL to the lagging "
        "average (AWM: 1.0; Flow-Factory: AWM collapses without it)",
    )
    ema_decay_rate: float = Field(
        0.001,
        ge=0,
        description="the average follows the weights once per epoch with "
        "decay min(rate x optimizer steps, ema_decay_max) (AWM: 0.001)",
    )
    ema_decay_max: float = Field(0.3, ge=0, lt=1, description="the average's largest decay (AWM: 0.3)")

    def old_decay(self, step: int) -> float:
        """The lagging average's decay after ``step`` optimizer steps."""
        return min(step * self.ema_decay_rate, self.ema_decay_max)
