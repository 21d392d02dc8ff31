"""A reward-finetuning trainer for text-to-image diffusion models (DDPO / Flow-GRPO, Diffusion-DPO, ReFL /
DRaFT / AlignProp, DiffusionNFT, AWM, DGPO), with rewards scored in-process or by reward servers.

``from trainer import Config, train, torch_images`` (imported lazily: ``python -m trainer --help`` and config checks
stay fast). ``train(cfg, reward_fn, prompt_fn)`` runs the algorithm ``cfg.algorithm`` names (trainer/algorithms/):
DDPO / Flow-GRPO (ddpo), DiffusionNFT (nft), AWM (awm), DGPO (dgpo), Diffusion-DPO (dpo, ``reward_fn`` only) or
ReFL (refl).
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "Config":
        from trainer.config import Config

        return Config
    if name == "train":
        return _train
    if name == "torch_images":
        from scorers.scorer import torch_images

        return torch_images
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")


def _train(cfg, reward_fn=None, prompt_fn=None, image_samples_hook=None) -> list[dict]:
    """The algorithm ``cfg.algorithm`` names, through the one dispatch (trainer/algorithms/__init__.py); an
    argument it does not take (dpo: reward_fn only; refl: none) is a ValueError."""
    from trainer.algorithms import run

    return run(cfg, reward_fn=reward_fn, prompt_fn=prompt_fn, image_samples_hook=image_samples_hook)
