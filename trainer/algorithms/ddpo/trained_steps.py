"""Which sampler steps DDPO may train, and the refusal of those whose std is 0 (checked with the configuration,
before any model loads). ``cfg`` is a trainer.config.Config, which calls in here while it validates."""

from __future__ import annotations

import math


def trainable_steps(cfg) -> range:
    """The sampler steps (indices into the schedule) that training may pick for some sample: the union over
    window starts of the steps train.timestep_fraction and train.timestep_selection choose (the count per sample
    is BatchPlan.train_timesteps_of's)."""
    train, ddpo, num_steps = cfg.train, cfg.ddpo, cfg.sample.num_steps
    stochastic = ddpo.timestep_window or num_steps
    count = max(1, int(stochastic * train.timestep_fraction))
    reach = count if train.timestep_selection == "first" else stochastic  # steps past the window's start
    if not ddpo.timestep_window:
        return range(reach)
    return range(ddpo.timestep_window_earliest_start, ddpo.timestep_window_latest_start + reach)


def draw_window(ddpo, rng) -> range | None:
    """The stochastic, trained steps of the next sampling batch (ddpo.timestep_window, Flow-GRPO-Fast): K steps
    from a start drawn uniformly between the earliest and latest start; None: every step."""
    if not ddpo.timestep_window:
        return None
    earliest, latest = ddpo.timestep_window_earliest_start, ddpo.timestep_window_latest_start
    start = int(rng.integers(earliest, latest + 1)) if latest > earliest else earliest
    return range(start, start + ddpo.timestep_window)


def last_step_fix(cfg) -> str:
    """What to change so that training never picks the sampler's last step (when its std is 0)."""
    n = cfg.sample.num_steps
    if n == 1:
        return "raise sample.num_steps"
    return (
        f"set --train.timestep_selection first --train.timestep_fraction {math.floor(100 * (n - 1) / n) / 100:g} "
        f"(the first steps only; Flow-GRPO's 0.99 of 10 steps trains 0-8), or a ddpo.timestep_window K with "
        f"K + ddpo.timestep_window_latest_start < {n}"
    )


def check_trained_steps_have_noise(cfg) -> None:
    """A step whose std is 0 gives a zero policy gradient and, floored at ddim.SIGMA_MIN, log-ratios of
    millions for the least change of its mean: refuse to train one. Here: the facts that hold for every model
    (a DDIM schedule's own zero-noise steps are checked from the model's scheduler config, trainer/preflight.py)."""
    if cfg.sample.eta == 0:
        raise ValueError(
            "sample.eta 0 makes every sampler step deterministic (std 0): DDPO has no step to "
            "train; set sample.eta above 0 (1.0: DDIM as ddpo-pytorch, 0.7: Flow-GRPO's SDE)"
        )
    last = cfg.sample.num_steps - 1
    if cfg.sample.sde_type == "cps" and last in trainable_steps(cfg):
        raise ValueError(
            f"sample.sde_type cps: its last step ({last}) goes to sigma 0 with std 0 and cannot be trained, but "
            f"train.timestep_fraction {cfg.train.timestep_fraction} with train.timestep_selection "
            f"{cfg.train.timestep_selection}"
            + (f" and ddpo.timestep_window {cfg.ddpo.timestep_window}" if cfg.ddpo.timestep_window else "")
            + f" can pick it: {last_step_fix(cfg)}"
        )
