"""The default run alone vs next to one CPU-bound process, with the trainer's thread choice and with a fixed
thread per core (torch's default), interleaved.

    python -m bench.contention [--epochs 4] [--rounds 2]

Each run is ``python -m trainer`` (the tiny default) for ``--epochs`` epochs; its epochs after the first
are timed (metrics.jsonl). Prints JSON: median epoch seconds per setting and the ratio busy / alone for
each thread policy (target <= 2.5).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

POLICIES = {"auto": [], "one_per_core": ["--run.cpu_threads", str(os.cpu_count() or 1)]}


def epoch_seconds(policy: str, epochs: int) -> tuple[list[float], list[int]]:
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # let the trainer choose
        subprocess.run(
            [
                sys.executable,
                "-m",
                "trainer",
                "--run.output_dir",
                tmp,
                "--run.num_epochs",
                str(epochs),
                "--run.log_with",
                "none",
                "--run.log_images_every",
                "0",
                *POLICIES[policy],
            ],
            check=True,
            capture_output=True,
            env=env,
        )
        records = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    return [r["seconds_epoch"] for r in records[1:]], [r["cpu_threads"] for r in records]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    times: dict[str, list[float]] = {}
    threads: dict[str, list[int]] = {}
    for _ in range(args.rounds):
        for policy in POLICIES:
            for busy in (False, True):
                hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
                try:
                    seconds, used = epoch_seconds(policy, args.epochs)
                finally:
                    if hog is not None:
                        hog.kill()
                        hog.wait()
                key = f"{policy}_{'busy' if busy else 'alone'}"
                times.setdefault(key, []).extend(seconds)
                threads.setdefault(key, []).extend(used)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        json.dumps(
            {
                "benchmark": "contention",
                "cores": os.cpu_count(),
                "epochs_timed_per_run": args.epochs - 1,
                "median_epoch_seconds": {k: round(v, 2) for k, v in med.items()},
                "cpu_threads_seen": {k: sorted(set(v)) for k, v in threads.items()},
                "ratio_busy_vs_alone": {p: round(med[f"{p}_busy"] / med[f"{p}_alone"], 2) for p in POLICIES},
                "ratio_auto_busy_vs_one_per_core_alone": round(med["auto_busy"] / med["one_per_core_alone"], 2),
                "target": "<= 2.5",
            }
        )
    )


if __name__ == "__main__":
    main()
