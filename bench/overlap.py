"""How long the trainer waits for rewards: after-sampling (TRL), per batch (ddpo-pytorch), across epochs (ours).

    python -m bench.overlap [--epochs 4] [--latency-ms 400]

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--latency-ms", type=float, default=400.0)
    args = parser.parse_args()

    from tests.conftest import ServerProcess
    from trainer.config import Config
    from trainer.train import train

    result = {"benchmark": "overlap", "epochs": args.epochs, "scorer_latency_ms_per_batch": args.latency_ms}
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(
            "--model", "synthetic", "--latency-ms", str(args.latency_ms), "--max-batch", "8",
            log=Path(tmp) / "server.log",
        ).wait_ready()
        try:
            fractions = {}
            for mode in ("none", "epoch", "next_epoch"):
                cfg = Config(
                    run={"output_dir": Path(tmp) / mode, "num_epochs": args.epochs, "log_with": "none", "log_images_every": 0},
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
    result["labels"] = {"none": "score after all sampling (TRL)", "epoch": "per batch (ddpo-pytorch)", "next_epoch": "ours"}
    result["target"] = "next_epoch <= 0.02 when the scorer keeps up"
    print(json.dumps(result))


if __name__ == "__main__":
    main()
