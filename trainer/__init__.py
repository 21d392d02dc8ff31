"""DDPO finetuning of Stable Diffusion with rewards scored in-process or by reward servers.

``from trainer import Config, train, torch_images`` (imported lazily: ``python -m trainer --help`` and config
checks stay fast).
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "Config":
        from trainer.config import Config

        return Config
    if name == "train":
        from trainer.ddpo import train

        return train
    if name == "torch_images":
        from reward_servers.scorer import torch_images

        return torch_images
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
