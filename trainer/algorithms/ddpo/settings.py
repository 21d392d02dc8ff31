"""The ``ddpo`` settings group (DDPO / Flow-GRPO), part of trainer.config.Config: the settings only DDPO's loop
reads. Until issue 40 they were in the shared ``train`` group; ``MOVED`` keeps the old ``--train.*`` spellings
working for one release (trainer/config/renamed.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from trainer.groups import _Group

# The settings that moved here from ``train``: their old spellings still work, with a note of the new name.
MOVED = ("cfg", "clip_range", "timestep_window", "timestep_window_latest_start", "decoupled_ppo")


class DDPOConfig(_Group):
    """DDPO (``--algorithm ddpo``; Black et al. 2023, github.com/kvablack/ddpo-pytorch) and Flow-GRPO (Liu et
    al. 2025, github.com/yifan123/flow_grpo): PPO-clip on the log-probs of the sampler's stochastic steps."""

    cfg: bool = Field(True, description="train on the guided prediction, as sampled")
    clip_range: float = Field(
        1e-2,
        gt=0,
        description="PPO ratio clip (ddpo-pytorch uses 1e-4 for SD1.5); with "
        "sample.sde_type cps the log-prob drops its constants, as Flow-GRPO (1e-5 there)",
    )
    timestep_window: int = Field(
        0,
        ge=0,
        description="K > 0: only K consecutive steps of each trajectory are "
        "stochastic and trained, the others deterministic (Flow-GRPO-Fast, MixGRPO); 0: all",
    )
    timestep_window_latest_start: int = Field(
        0,
        ge=0,
        description="the window starts at a step drawn uniformly "
        "from ddpo.timestep_window_earliest_start to this, per sampling batch (0: the first K steps)",
    )
    timestep_window_earliest_start: int = Field(
        0,
        ge=0,
        description="the earliest step the window may start at (Flow-Factory's sde_steps [1, 2, 3]: "
        "earliest 1, latest 3)",
    )
    decoupled_ppo: Literal["auto", "on", "off"] = Field(
        "auto",
        description="on: clip the PPO ratio around the weights at the start of each update and weight it "
        "back to the sampling weights (decoupled PPO), one more forward per trained step; auto: on exactly when "
        "reward.overlap is next_epoch, whose samples are one update old",
    )
