"""Rewards to advantages: normalised over the epoch's batch, per group of images of one prompt, or per
exact prompt string across epochs."""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np


def batch_normalize(rewards: np.ndarray) -> np.ndarray:
    return (rewards - rewards.mean()) / (rewards.std() + 1e-8)


class PerPromptStatTracker:
    """A reward buffer per prompt, keyed by the prompt string itself (not by decoded tokens).

    With at least ``min_count`` rewards for a prompt, its advantages use that prompt's mean and std; before
    that, the whole batch's. Its state is plain data so it can go into a checkpoint.
    """

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers: dict[str, deque[float]] = {}

    def update(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        advantages = np.empty_like(rewards, dtype=np.float64)
        prompts_arr = np.array(prompts, dtype=object)
        for prompt in dict.fromkeys(prompts):
            mask = prompts_arr == prompt
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(rewards[mask].tolist())
            if len(buffer) >= self.min_count:
                mean, std = np.mean(buffer), np.std(buffer) + 1e-6
            else:
                mean, std = rewards.mean(), rewards.std() + 1e-6
            advantages[mask] = (rewards[mask] - mean) / std
        return advantages

    def state_dict(self) -> dict[str, Any]:
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "buffers": {k: list(v) for k, v in self.buffers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer_size, self.min_count = state["buffer_size"], state["min_count"]
        self.buffers = {k: deque(v, maxlen=self.buffer_size) for k, v in state["buffers"].items()}


def group_normalize(rewards: np.ndarray, groups: np.ndarray, global_std: bool = False, eps: float = 1e-6) -> np.ndarray:
    """(r - mean of its group) / (std of its group, or of all rewards when ``global_std``, + ``eps``)."""
    advantages = np.empty_like(rewards, dtype=np.float64)
    for group in np.unique(groups):
        mask = groups == group
        std = rewards.std() if global_std else rewards[mask].std()
        advantages[mask] = (rewards[mask] - rewards[mask].mean()) / (std + eps)
    return advantages


def advantage_groups(prompts: list[str], images_per_prompt: int, group_by: str = "group") -> np.ndarray | None:
    """Each gathered sample's group (train.group_by): group, its run of ``images_per_prompt`` consecutive
    samples (one prompt, one process and batch; None when 1: the whole epoch); prompt, its prompt string, so
    a prompt drawn twice in an epoch is one group, as flow_grpo's PerPromptStatTracker (cleared every epoch)
    pools it in Flow-GRPO, DiffusionNFT and AWM."""
    if group_by == "prompt":
        return np.unique(np.array(prompts, dtype=object), return_inverse=True)[1]
    return np.arange(len(prompts)) // images_per_prompt if images_per_prompt > 1 else None


def compute_advantages(
    rewards: np.ndarray,
    prompts: list[str],
    tracker: PerPromptStatTracker | None = None,
    groups: np.ndarray | None = None,
    global_std: bool = False,
) -> np.ndarray:
    """Advantages for the whole gathered epoch (every process passes the same arrays)."""
    if tracker is not None:
        return tracker.update(prompts, rewards)
    if groups is not None:
        return group_normalize(rewards, groups, global_std)
    return batch_normalize(rewards)


def kept_advantages(rewards: np.ndarray, prompts: list[str], tracker, groups, global_std: bool, drop: np.ndarray):
    """compute_advantages over the samples not dropped only (so that a dropped sample moves
    no group's mean or std), and 0 for the dropped: they are left out of the update, never trained on as a
    made-up score."""
    keep = ~drop
    advantages = np.zeros(len(rewards), dtype=np.float64)
    if keep.any():
        kept_groups = None if groups is None else np.asarray(groups)[keep]
        kept_prompts = [p for p, k in zip(prompts, keep) if k]
        advantages[keep] = compute_advantages(rewards[keep], kept_prompts, tracker, kept_groups, global_std)
    return advantages
