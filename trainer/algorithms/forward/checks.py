"""DiffusionNFT's and AWM's configuration check, run while trainer.config.Config validates."""

from __future__ import annotations

from trainer.algorithms.checks import kl_needs_lora


def check(cfg) -> None:
    kl_needs_lora(cfg)  # train.kl_coef: the KL to the base model of both (DiffusionNFT's and AWM's beta)
