"""How long the trainer waits for rewards: after-sampling (TRL), per batch (ddpo-pytorch), across epochs (ours).

    python -m bench.overlap [--epochs 4] [--latency-ms 400]
    python -m bench.overlap --learning [--epochs 24] [--clip-range 1e-4] [--runs epoch,next_epoch,next_epoch_decoupled]

``--learning`` asks what next_epoch costs in learning instead: the tiny run with the in-process JPEG reward,
``epoch``, ``next_epoch`` and ``next_epoch`` with decoupled PPO, from the same seed. Prints JSON per run: the
clip fraction before each epoch's first update (0 when the samples come from the current weights;
next_epoch's come from weights one epoch of updates old), the mean clip fraction, the reward rise (mean of
the last 3 epochs - the first 3) in units of the within-epoch reward std, and seconds of training per epoch.

A real reward-server runs the synthetic scorer, which takes ``--latency-ms`` per request (one request per
sampling batch, one replica, so requests queue like a busy scorer's). The tiny default run samples, waits
and trains under each ``reward.overlap`` mode. Prints JSON: the reward-wait fraction of epoch wall time per
mode (epoch 0 left out as warm-up), and the scorer's vs the sampler's throughput (target for next_epoch:
<= 2% when the scorer keeps up with sampling).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


RUNS = {"epoch": ("epoch", "off"), "next_epoch": ("next_epoch", "off"), "next_epoch_decoupled": ("next_epoch", "on")}


def learning(epochs: int, ddpo_options: dict, names: list[str], seed: int = 42) -> dict:
    import numpy as np

    from trainer.config import Config
    from trainer.algorithms.ddpo.loop import train

    modes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            mode, decoupled = RUNS[name]
            cfg = Config(
                run={
                    "output_dir": Path(tmp) / name,
                    "num_epochs": epochs,
                    "log_with": "none",
                    "log_images_every": 0,
                    "seed": seed,
                },
                ddpo={**ddpo_options, "decoupled_ppo": decoupled},
                reward={"overlap": mode},
            )
            history = train(cfg)
            means = np.array([m["reward_mean"] for m in history])
            stds = np.array([m["reward_std"] for m in history])
            later = history[1:]  # epoch 0 is sampled from the initial weights in both modes
            modes[name] = {
                "clipfrac_first_step": round(float(np.mean([m["clipfrac_first_step"] for m in later])), 4),
                # decoupled: the share of steps whose sampling weights lie outside the clip range of the
                # current ones (what clipfrac_first_step is without decoupling)
                "stale_clipfrac": round(float(np.mean([m.get("stale_clipfrac", np.nan) for m in later])), 4),
                "clipfrac": round(float(np.mean([m["clipfrac"] for m in later])), 4),
                "approx_kl": float(np.mean([m["approx_kl"] for m in later])),
                "rise_in_epoch_std": round(float((means[-3:].mean() - means[:3].mean()) / stds.mean()), 2),
                "reward_mean_per_epoch": [round(float(x), 3) for x in means],
                "seconds_training": round(float(np.median([m["seconds_training"] for m in history])), 2),
            }
    return {"benchmark": "overlap-learning", "epochs": epochs, "seed": seed, "ddpo": ddpo_options, "modes": modes}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--latency-ms", type=float, default=400.0)
    parser.add_argument("--learning", action="store_true", help="epoch vs next_epoch: clip fractions and reward rise")
    parser.add_argument("--clip-range", type=float, help="ddpo.clip_range for --learning (default: the tiny run's)")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"for --learning, some of {', '.join(RUNS)}")
    parser.add_argument("--seed", type=int, default=42, help="run.seed for --learning")
    args = parser.parse_args()
    if args.learning:
        options = {} if args.clip_range is None else {"clip_range": args.clip_range}
        print(json.dumps(learning(args.epochs, options, args.runs.split(","), args.seed)))
        return

    from tests.conftest import ServerProcess
    from trainer.config import Config
    from trainer.algorithms.ddpo.loop import train

    result = {"benchmark": "overlap", "epochs": args.epochs, "scorer_latency_ms_per_batch": args.latency_ms}
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(
            "--model",
            "synthetic",
            "--latency-ms",
            str(args.latency_ms),
            "--max-batch",
            "8",
            log=Path(tmp) / "server.log",
        ).wait_ready()
        try:
            fractions = {}
            for mode in ("none", "epoch", "next_epoch"):
                cfg = Config(
                    run={
                        "output_dir": Path(tmp) / mode,
                        "num_epochs": args.epochs,
                        "log_with": "none",
                        "log_images_every": 0,
                    },
                    reward={"url": [server.url], "scorer": "synthetic", "overlap": mode},
                )
                history = train(cfg)[1:]
                wait = sum(m["seconds_reward_wait"] for m in history)
                wall = sum(m["seconds_epoch"] for m in history)
                fractions[mode] = round(wait / wall, 4)
                if mode == "epoch":
                    batches = cfg.sample.num_batches_per_epoch
                    per_batch = sum(m["seconds_sampling"] for m in history) / len(history) / batches
                    result["sampling_seconds_per_batch"] = round(per_batch, 3)
                    result["scorer_keeps_up"] = args.latency_ms / 1000 <= per_batch
        finally:
            server.stop()
    result["reward_wait_fraction"] = fractions
    result["labels"] = {
        "none": "score after all sampling (TRL)",
        "epoch": "per batch (ddpo-pytorch)",
        "next_epoch": "ours",
    }
    result["target"] = "next_epoch <= 0.02 when the scorer keeps up"
    print(json.dumps(result))


if __name__ == "__main__":
    main()
