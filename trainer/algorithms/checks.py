"""Configuration checks that several algorithms share (not an algorithm: any of them may import it)."""

from __future__ import annotations


def kl_needs_lora(cfg) -> None:
    """The loops with a KL term to the base model (ddpo, nft, awm) take the base as the denoiser with its LoRA
    adapters disabled: without LoRA there is no base to compare with."""
    if cfg.train.kl_coef and not cfg.train.lora:
        raise ValueError(
            "train.kl_coef: the KL reference is the UNet with its LoRA adapters disabled; enable train.lora"
        )
