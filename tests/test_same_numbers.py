"""Every algorithm on a tiny family logs the numbers it logged when they were recorded: the guard for
restructurings that must not change behaviour (same seed, same metrics, to float rounding).

Re-record only for an intended change of the numbers, and say which in the commit:
``python -m tests.test_same_numbers`` rewrites tests/data/same_numbers.json.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path

import pytest

RECORDED = Path(__file__).parent / "data" / "same_numbers.json"
_SMALL = {
    "sample": {"num_steps": 4, "batch_size": 4, "num_batches_per_epoch": 1, "images_per_prompt": 2},
    "train": {"batch_size": 2, "gradient_accumulation_steps": 1},
}
_SHAPES = {
    "pretrained": {"model": "tiny-shapes"},
    "prompt": {"fn": "shapes"},
    "train": {"batch_size": 2, "gradient_accumulation_steps": 1, "learning_rate": 1e-4},
}
RUNS = {
    "ddpo-tiny": {"preset": "tiny", **_SMALL},
    "ddpo-tiny-flux": {"preset": "tiny-flux", **_SMALL},
    "nft-tiny-sd3": {"preset": "tiny-sd3", "algorithm": "nft", **_SMALL, "sample": {**_SMALL["sample"], "eta": 0.0}},
    "awm-tiny-sdxl": {
        "preset": "tiny-sdxl",
        "algorithm": "awm",
        **_SMALL,
        "train": {**_SMALL["train"], "timestep_selection": "stratified", "kl_coef": 1e-3},
    },
    "dpo-online-shapes": {
        "algorithm": "dpo",
        **_SHAPES,
        "reward": {"scorer": "shapes"},
        "sample": {"num_steps": 4, "batch_size": 4},
        "dpo": {"online": True, "online_pairs": 4, "max_train_steps": 2, "checkpointing_steps": 0},
    },
    "refl-shapes": {
        "algorithm": "refl",
        **_SHAPES,
        "reward": {"scorer": "aesthetic", "options": {"checkpoint": "tiny-shapes"}},
        "refl": {"num_steps": 4, "mid_low": 2, "mid_high": 3, "max_train_steps": 2},
    },
}
_NOT_NUMBERS = ("seconds_", "data_wait", "cpu_threads", "weights_spread")  # timings, the machine's threads


def numbers(name: str, cache: Path, out: Path) -> list[dict[str, float]]:
    import importlib

    import torch

    from trainer.config import Config

    torch.set_num_threads(1)
    spec = dict(RUNS[name])
    pretrained = {**spec.pop("pretrained", {}), "cache_dir": cache}
    run = {"output_dir": out, "num_epochs": 2, "log_with": "none", "log_images_every": 0, "seed": 7}
    cfg = Config(**spec, run=run, pretrained=pretrained)
    module = {"nft": "forward", "awm": "forward"}.get(cfg.algorithm, cfg.algorithm)
    train = importlib.import_module(f"trainer.algorithms.{module}.loop").train
    return [{k: v for k, v in m.items() if isinstance(v, float) and not k.startswith(_NOT_NUMBERS)} for m in train(cfg)]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_the_same_seed_logs_the_recorded_numbers(name, tiny_cache, tmp_path):
    recorded = json.loads(RECORDED.read_text())[name]
    logged = numbers(name, tiny_cache, tmp_path)
    assert [sorted(m) for m in logged] == [sorted(m) for m in recorded]  # the same metrics, no more, no fewer
    for step, (ours, then) in enumerate(zip(logged, recorded)):
        for key, value in then.items():
            assert math.isclose(ours[key], value, rel_tol=1e-5, abs_tol=1e-9), (name, step, key, ours[key], value)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        RECORDED.write_text(
            json.dumps({name: numbers(name, Path(tmp) / "cache", Path(tmp) / name) for name in RUNS}, indent=1) + "\n"
        )
    print(f"recorded {len(RUNS)} runs into {RECORDED}", file=sys.stderr)
