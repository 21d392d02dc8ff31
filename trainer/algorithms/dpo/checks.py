"""Diffusion-DPO's configuration checks, run while trainer.config.Config validates."""

from __future__ import annotations


def check(cfg) -> None:
    if cfg.dpo.dataset is None and not cfg.dpo.online:
        raise ValueError(
            "dpo.dataset: --algorithm dpo trains on preference pairs; give a folder or a hub id "
            "(or sample them: --dpo.online)"
        )
    if cfg.dpo.reference == "ema" and (cfg.train.lora or not cfg.train.ema_decay):
        raise ValueError(
            "dpo.reference ema is the moving average of a fully finetuned policy: it needs "
            f"train.lora false (got {cfg.train.lora}) and train.ema_decay above 0 (got "
            f"{cfg.train.ema_decay}, e.g. 0.999)"
        )
    if cfg.dpo.online and cfg.dpo.online_pairs < cfg.train.batch_size:
        raise ValueError(
            f"dpo.online_pairs ({cfg.dpo.online_pairs}) must fill at least one batch of "
            f"train.batch_size ({cfg.train.batch_size})"
        )
