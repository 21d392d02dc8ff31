"""The one dispatch (trainer/algorithms/__init__.py): every ``--algorithm`` is in ``ALGORITHMS``, each entry
names a train function that exists, and ``trainer.train()`` reaches every algorithm (dpo and refl included),
refusing an argument the algorithm does not take before anything loads."""

from __future__ import annotations

import inspect
import typing

import pytest

import trainer
from trainer.algorithms import ALGORITHMS, _resolve
from trainer.config import Config


def test_every_algorithm_is_dispatched():
    assert set(typing.get_args(Config.model_fields["algorithm"].annotation)) == set(ALGORITHMS)
    for name, algorithm in ALGORITHMS.items():
        assert "cfg" in inspect.signature(_resolve(algorithm.train)).parameters, name
        if algorithm.preflight:
            assert callable(_resolve(algorithm.preflight)), name


@pytest.mark.parametrize(("algorithm", "refused"), [("refl", "reward_fn"), ("dpo", "prompt_fn")])
def test_train_refuses_what_the_algorithm_does_not_take(algorithm, refused):
    cfg = Config(
        algorithm=algorithm,
        **({"dpo": {"online": True}} if algorithm == "dpo" else {"reward": {"scorer": "aesthetic"}}),
    )
    with pytest.raises(ValueError, match=f"algorithm: {algorithm} takes no {refused}"):
        trainer.train(cfg, **{refused: lambda *a: None})


@pytest.mark.parametrize(
    "module",
    ["trainer.algorithms", *(f"trainer.algorithms.{name}.settings" for name in ("ddpo", "dpo", "forward", "refl"))],
)
def test_each_settings_group_imports_first(module):
    """trainer.config imports every algorithm's settings group: a group imported before trainer.config (as a
    test or a user's script may) must not find trainer.config half-built (trainer/groups.py holds the bases)."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", f"import {module}; import trainer.config"], check=True)


def test_every_settings_group_of_an_algorithm_is_in_config():
    """Config names each algorithm's settings group by hand (docs/layout.md says why it is not built from
    ALGORITHMS): a group defined in trainer/algorithms/<name>/settings.py but left out of Config would be
    reachable by no flag, no preset and no config file."""
    import importlib
    import importlib.util
    import pkgutil

    import trainer.algorithms as package
    from trainer.groups import _Group

    groups = set()
    for folder in pkgutil.iter_modules(package.__path__):
        name = f"trainer.algorithms.{folder.name}.settings"
        if folder.ispkg and importlib.util.find_spec(name) is not None:
            module = importlib.import_module(name)
            groups |= {
                kind
                for kind in vars(module).values()
                if isinstance(kind, type) and issubclass(kind, _Group) and kind.__module__ == name
            }
    in_config = {field.annotation for field in Config.model_fields.values()}
    assert len(groups) >= 5 and groups <= in_config, sorted(g.__name__ for g in groups - in_config)
