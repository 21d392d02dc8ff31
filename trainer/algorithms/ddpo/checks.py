"""DDPO's configuration checks, run while trainer.config.Config validates (before any model loads)."""

from __future__ import annotations

from trainer.algorithms.ddpo.trained_steps import check_trained_steps_have_noise


def check(cfg) -> None:
    """Settings that each make sense alone but contradict each other in a DDPO run."""
    d = cfg.ddpo
    window, last = d.timestep_window, d.timestep_window + d.timestep_window_latest_start
    if d.timestep_window_earliest_start > d.timestep_window_latest_start:
        raise ValueError(
            f"ddpo.timestep_window_earliest_start ({d.timestep_window_earliest_start}) must not exceed "
            f"ddpo.timestep_window_latest_start ({d.timestep_window_latest_start})"
        )
    if window and last > cfg.sample.num_steps:
        raise ValueError(
            f"ddpo.timestep_window ({window}) + ddpo.timestep_window_latest_start "
            f"({d.timestep_window_latest_start}) = {last} must not exceed sample.num_steps "
            f"({cfg.sample.num_steps})"
        )
    check_trained_steps_have_noise(cfg)
    if not d.cfg and cfg.sample.guidance_scale != 1.0:
        # The PPO ratio compares the training policy with the sampling one: they must be the same policy.
        raise ValueError(
            f"ddpo.cfg is false (train on the unguided prediction) but sample.guidance_scale "
            f"({cfg.sample.guidance_scale}) samples guided, so the ratio starts away from 1: set "
            "sample.guidance_scale 1 or ddpo.cfg true"
        )


def stochastic_steps(cfg) -> int:
    """The sampler steps with noise, among which training picks: the window's (Flow-GRPO-Fast, MixGRPO) or all."""
    return cfg.ddpo.timestep_window or cfg.sample.num_steps
