"""Does a torch scorer on the trainer's helper thread slow training? The same run with the tiny aesthetic
scorer (CLIP + MLP, torch) in process, and behind a reward server in its own process.

    python -m bench.scorer_thread [--epochs 6] [--rounds 2]

Runs alternate (in process, served, in process, ...) so the machine's drift hits both alike. Prints JSON:
the median seconds of training and of sampling per epoch for each, and their ratios in process / served.
Both scorers run the same model on the same CPU cores, so the served one competes for them as well: the
ratio isolates what the helper thread itself costs the training threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path


def run(out: Path, epochs: int, reward: dict) -> list[dict]:
    from trainer.config import Config
    from trainer.algorithms.ddpo.loop import train

    cfg = Config(
        run={"output_dir": out, "num_epochs": epochs, "log_with": "none", "log_images_every": 0},
        reward={"scorer": "aesthetic", "options": {"checkpoint": "tiny"}, **reward},
    )
    return train(cfg)[1:]  # the first epoch warms up


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from tests.conftest import ServerProcess

    seconds = {"in_process": {"training": [], "sampling": []}, "served": {"training": [], "sampling": []}}
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess("--model", "aesthetic", "--checkpoint", "tiny", log=Path(tmp) / "server.log").wait_ready(
            120
        )
        try:
            for r in range(args.rounds):
                for name, reward in (("in_process", {}), ("served", {"url": [server.url]})):
                    for m in run(Path(tmp) / f"{name}-{r}", args.epochs, reward):
                        seconds[name]["training"].append(m["seconds_training"])
                        seconds[name]["sampling"].append(m["seconds_sampling"])
        finally:
            server.stop()
    medians = {name: {k: round(statistics.median(v), 3) for k, v in parts.items()} for name, parts in seconds.items()}
    print(
        json.dumps(
            {
                "benchmark": "scorer_thread",
                "epochs": args.epochs,
                "rounds": args.rounds,
                "median_seconds": medians,
                "ratio_training_in_process_vs_served": round(
                    medians["in_process"]["training"] / medians["served"]["training"], 3
                ),
                "ratio_sampling_in_process_vs_served": round(
                    medians["in_process"]["sampling"] / medians["served"]["sampling"], 3
                ),
            }
        )
    )


if __name__ == "__main__":
    main()
