"""A reward-finetuning trainer for text-to-image diffusion models (DDPO / Flow-GRPO, Diffusion-DPO, ReFL /
DRaFT / AlignProp, DiffusionNFT, AWM), with rewards scored in-process or by reward servers.

``from trainer import Config, train, torch_images`` (imported lazily: ``python -m trainer --help`` and config
checks stay fast). ``train(cfg, reward_fn, prompt_fn)`` runs the online algorithm ``cfg.algorithm`` names:
DDPO / Flow-GRPO (ddpo), DiffusionNFT (nft) or AWM (awm).
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
    """The online algorithm of ``cfg.algorithm`` (trainer.ddpo.train, or trainer.forward.train for nft and awm,
    which take the same arguments)."""
    if cfg.algorithm in ("nft", "awm"):
        from trainer.forward import train
    elif cfg.algorithm == "ddpo":
        from trainer.ddpo import train
    else:
        raise ValueError(
            f"algorithm: trainer.train runs ddpo, nft or awm; for {cfg.algorithm} call trainer.{cfg.algorithm}.train"
        )
    return train(cfg, reward_fn, prompt_fn, image_samples_hook)
