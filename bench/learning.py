"""Does the default run learn? Train, then report the reward curve and its rise in epoch-std units.

    python -m bench.learning [trainer overrides; --run.num_epochs 110 fills 10 minutes on 2 cores]

Prints JSON: per-epoch reward means and the rise (mean of the last 3 epochs - mean of the first 3) in two
units: the spread of rewards within an epoch (mean of the per-epoch std: how far the whole distribution
moved; the issue's target of 5 is read in this unit) and the noise of an epoch's mean reward (estimated
from successive epoch means, whose difference cancels slow trends: how clearly the curve rose above its
own noise). Also the seconds per epoch split into sampling / reward wait / training.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time

import numpy as np
from pydantic_settings import CliApp

from trainer.config import Config
from trainer.ddpo import train


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = CliApp.run(Config, cli_args=["--run.output_dir", tmp, "--run.log_with", "none", *sys.argv[1:]])
        start = time.perf_counter()
        history = train(cfg)
        wall = time.perf_counter() - start
    means = np.array([m["reward_mean"] for m in history])
    stds = np.array([m["reward_std"] for m in history])
    k = min(3, len(means))
    rise = means[-k:].mean() - means[:k].mean()
    result = {
        "benchmark": "learning",
        "config": cfg.model_dump(mode="json", include={"sample", "train"}),
        "epochs": len(history),
        "wall_seconds": round(wall, 1),
        "reward_mean_per_epoch": [round(float(x), 4) for x in means],
        "rise_in_epoch_std": round(float(rise / stds.mean()), 2),
        "rise_in_epoch_mean_noise": round(float(rise / (np.diff(means).std() / np.sqrt(2))), 2) if len(means) > 2 else None,
        "seconds_per_epoch": {
            part: round(float(np.median([m[f"seconds_{part}"] for m in history])), 2)
            for part in ("sampling", "reward_wait", "training")
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
