"""The algorithms, one folder each, and ``ALGORITHMS``: the one map from ``--algorithm`` to each, through which
the command line (trainer/cli.py), ``trainer.train()`` (trainer/__init__.py), the configuration's checks
(trainer/config) and the preflight (trainer/preflight.py) reach them. Adding an algorithm is a folder here and
a line in ``ALGORITHMS`` (and its settings group in trainer.config.Config, when it has one).

Kept light: trainer.config imports this while it validates, so the loops and preflight checks are named here
by ``module:function`` and imported only when a run starts.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable

from trainer.algorithms.ddpo import checks as ddpo_checks
from trainer.algorithms.dgpo import checks as dgpo_checks
from trainer.algorithms.dpo import checks as dpo_checks
from trainer.algorithms.forward import checks as forward_checks
from trainer.algorithms.refl import checks as refl_checks


def _all_steps(cfg) -> int:
    return cfg.sample.num_steps


@dataclass(frozen=True)
class Algorithm:
    """What the shared engine needs of an algorithm."""

    train: str  # "module:function", the run: train(cfg, reward_fn=None, ...) -> the logged metrics
    check: Callable[[Any], None]  # configuration checks (raise ValueError), run while Config validates
    preflight: str | None = None  # "module:function", problems(cfg, model_found) -> list[str], before loading
    stochastic_steps: Callable[[Any], int] = _all_steps  # the sampler steps training picks among
    # how many of them each sample trains at; None: train.timestep_fraction of them
    trained_steps: Callable[[Any], int] | None = None
    # the loss is local in the velocity (or noise) prediction: train.norm_guard_coef adds NormGuard's hinge to it
    norm_guard: bool = False


ALGORITHMS: dict[str, Algorithm] = {
    "ddpo": Algorithm(
        "trainer.algorithms.ddpo.loop:train",
        ddpo_checks.check,
        "trainer.algorithms.ddpo.preflight:problems",
        ddpo_checks.stochastic_steps,
    ),
    "dpo": Algorithm(
        "trainer.algorithms.dpo.loop:train", dpo_checks.check, "trainer.algorithms.dpo.preflight:problems"
    ),
    "refl": Algorithm(
        "trainer.algorithms.refl.loop:train", refl_checks.check, "trainer.algorithms.refl.preflight:problems"
    ),
    "nft": Algorithm("trainer.algorithms.forward.loop:train", forward_checks.check, norm_guard=True),
    "awm": Algorithm("trainer.algorithms.forward.loop:train", forward_checks.check, norm_guard=True),
    "dgpo": Algorithm(
        "trainer.algorithms.dgpo.loop:train",
        dgpo_checks.check,
        trained_steps=dgpo_checks.trained_steps,
        norm_guard=True,
    ),
}


def _resolve(target: str) -> Callable:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def run(cfg, **given) -> list[dict]:
    """Run ``cfg.algorithm`` with the arguments given (None ones left out); an argument the algorithm does not
    take (e.g. ``prompt_fn`` for refl) is a ValueError naming it."""
    train = _resolve(ALGORITHMS[cfg.algorithm].train)
    given = {name: value for name, value in given.items() if value is not None}
    accepted = inspect.signature(train).parameters
    refused = [name for name in given if name not in accepted]
    if refused:
        raise ValueError(f"algorithm: {cfg.algorithm} takes no {', '.join(refused)} (it takes {', '.join(accepted)})")
    return train(cfg, **given)


def algorithm_problems(cfg, model_found: bool) -> list[str]:
    """The algorithm's own preflight problems (none when it has no check)."""
    target = ALGORITHMS[cfg.algorithm].preflight
    return _resolve(target)(cfg, model_found) if target else []
