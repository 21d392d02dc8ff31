"""DiffusionNFT's and AWM's configuration check, run while trainer.config.Config validates."""

from __future__ import annotations


def check(cfg) -> None:
    """Nothing of theirs contradicts another setting: their KL to the base (train.kl_coef) has a base with LoRA
    (the adapters off) and with full finetuning (a frozen copy) alike."""
