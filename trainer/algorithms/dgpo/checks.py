"""DGPO's configuration check, run while trainer.config.Config validates."""

from __future__ import annotations


def trained_steps(cfg) -> int:
    """The steps each sample trains at: dgpo.num_timesteps (not train.timestep_fraction)."""
    return cfg.dgpo.num_timesteps


def check(cfg) -> None:
    d, g = cfg.dgpo, cfg.sample.images_per_prompt
    if d.num_timesteps > d.trunc_steps(cfg.sample.num_steps):
        raise ValueError(
            f"dgpo.num_timesteps ({d.num_timesteps}) must be at most the first dgpo.trunc x sample.num_steps = "
            f"{d.trunc_steps(cfg.sample.num_steps)} steps it is drawn from"
        )
    if not d.use_ema_ref and not cfg.train.lora and not cfg.train.kl_coef:
        # the base model (run.Trained.base()): LoRA's adapters off, or with full finetuning the frozen copy kept
        # only for train.kl_coef
        raise ValueError(
            "dgpo: the reference is the base model: the denoiser with its LoRA adapters off, or with full "
            "finetuning a frozen copy kept for train.kl_coef; enable train.lora, set train.kl_coef or set "
            "dgpo.use_ema_ref"
        )
    if d.kl_mask and not (d.clip and cfg.train.kl_coef):
        raise ValueError(
            f"dgpo.kl_mask applies dgpo.clip's mask to train.kl_coef's KL: it needs both above 0 (dgpo.clip "
            f"{d.clip}, train.kl_coef {cfg.train.kl_coef})"
        )
    if cfg.train.batch_size % g:
        raise ValueError(
            f"dgpo: train.batch_size ({cfg.train.batch_size}) must be a multiple of sample.images_per_prompt ({g}): "
            "a group's weight needs all its samples in one training batch"
        )
