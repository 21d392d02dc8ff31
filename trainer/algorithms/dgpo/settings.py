"""The ``dgpo`` settings group (DGPO, arXiv 2510.08425), part of trainer.config.Config."""

from __future__ import annotations

from pydantic import Field

from trainer.groups import _Group


class DGPOConfig(_Group):
    """DGPO (``--algorithm dgpo``; Luo et al. 2025, "Reinforcing Diffusion Models by Direct Group Preference
    Optimization", arXiv 2510.08425, github.com/Luo-Yihong/DGPO): rollouts at sample.eta (0: the deterministic
    ODE sampler) with guidance sample.guidance_scale keep clean latents and rewards; training is each sample's
    denoising loss dsm_i at dgpo.num_timesteps steps of the first dgpo.trunc of the schedule (shared by its
    group), weighted by its clipped advantage A_i and its group's sigmoid(beta_dpo sum_i A_i (dsm_i - ref_i) / G)
    (docs/dgpo.md). The KL to the base model is train.kl_coef (DGPO's ``kl``: beta x mean (v - v_ref)^2, 0.02
    GenEval, 0.001 PickScore); the advantages' clip train.adv_clip_max (5)."""

    beta_dpo: float = Field(
        100.0,
        gt=0,
        description="beta of the group weight sigmoid(beta_dpo x sum_i A_i (dsm_i - ref_i) / G) (DGPO's "
        "beta_dpo: 100 GenEval, 10 PickScore; 2000-5000 with use_ema_ref)",
    )
    num_timesteps: int = Field(
        4,
        gt=0,
        description="M, the steps each sample trains at, drawn once per group (DGPO's num_train_timesteps: 4); "
        "train.timestep_fraction and train.timestep_selection do not apply",
    )
    trunc: float = Field(
        0.6,
        gt=0,
        le=1.0,
        description="the steps are drawn from the first trunc x sample.num_steps of the schedule, noisiest "
        "first (DGPO's trunc_steps 6 of 10; Flow-Factory's timestep_range 0.6)",
    )
    use_shared_noise: bool = Field(
        True, description="one noise draw per group and step, shared by its samples (DGPO's use_shared_noise)"
    )
    clip: float = Field(
        1e-2,
        ge=0,
        description="c of the PPO-style clip on dsm against the EMA old model (DGPO's clip_dsm range): ratio "
        "exp(old_dsm - dsm), a sample's dsm stops its gradient when ratio > 1 + c with A > 0 or ratio < 1 - c "
        "with A <= 0; 0: no clip (1e-2 GenEval; 1e-3..1e-2 with rollout guidance)",
    )
    kl_mask: bool = Field(
        False,
        description="apply the clip's mask to train.kl_coef's KL as well: a masked sample's KL gives no gradient "
        "(DGPO's option; needs dgpo.clip and train.kl_coef)",
    )
    use_ema_ref: bool = Field(
        False,
        description="ref_i from the EMA old model instead of the base (the denoiser with its LoRA adapters off, "
        "or with full finetuning the frozen copy train.kl_coef keeps; DGPO's use_ema_ref)",
    )
    kl_cfg: float = Field(
        1.0,
        ge=1.0,
        description="classifier-free guidance of the base's reference prediction (ref_i and train.kl_coef's KL) "
        "against the empty prompt (DGPO's kl_cfg: 4.5 in its CFG-free mode, where rollouts sample at "
        "sample.guidance_scale 1 and the reference carries the guidance; clip 1e-5..1e-4 there); 1: the "
        "conditional prediction, as DGPO's rollout-CFG recipes",
    )
    old_decay_rate: float = Field(
        0.001, ge=0, description="the EMA old model's decay min(rate x optimizer steps, old_decay_max) (DGPO: 0.001)"
    )
    old_decay_max: float = Field(
        0.3, ge=0, lt=1, description="its largest decay (DGPO: 0.3); the EMA steps after every optimizer step"
    )
    switch_ema_ref: int = Field(
        200,
        ge=0,
        description="after this many optimizer steps the rollouts sample with the EMA old weights (DGPO's "
        "switch_ema_ref: 200; 500 GenEval); 0: never",
    )

    def old_decay(self, step: int) -> float:
        """The EMA old model's decay after ``step`` optimizer steps."""
        return min(step * self.old_decay_rate, self.old_decay_max)

    def trunc_steps(self, num_steps: int) -> int:
        """How many of the schedule's first steps the trained steps are drawn from."""
        return max(1, round(self.trunc * num_steps))
