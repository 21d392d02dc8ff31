"""Load: many concurrent clients against one reward server; errors and latency percentiles.

    python -m bench.load [--clients 32] [--requests 20] [--model compression] [--images 4]

Starts a real reward-server, then ``--clients`` asyncio clients each send ``--requests`` requests of
``--images`` 256 px images back to back. Prints JSON: errors, p50/p90/p99 latency, images/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import numpy as np


async def hammer(url: str, clients: int, requests: int, images: np.ndarray) -> tuple[list[float], int]:
    from protocol import RewardClient

    client = RewardClient(url, retries=0)  # count every failure: nothing is retried here
    latencies, errors = [], 0

    async def one() -> None:
        nonlocal errors
        for _ in range(requests):
            start = time.perf_counter()
            try:
                await client.score(images, ["a photo"] * len(images))
                latencies.append(time.perf_counter() - start)
            except Exception:
                errors += 1

    await asyncio.gather(*(one() for _ in range(clients)))
    await client.aclose()
    return latencies, errors


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--model", default="compression")
    parser.add_argument("--images", type=int, default=4)
    args = parser.parse_args()

    from tests.conftest import ServerProcess

    images = np.random.default_rng(0).integers(0, 256, (args.images, 256, 256, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(
            "--model", args.model, "--log-level", "warning", log=Path(tmp) / "server.log"
        ).wait_ready()
        try:
            start = time.perf_counter()
            latencies, errors = asyncio.run(hammer(server.url, args.clients, args.requests, images))
            wall = time.perf_counter() - start
            batch_mean = server.metric("reward_batch_images_sum") / max(1.0, server.metric("reward_batch_images_count"))
        finally:
            server.stop()
    ms = np.array(latencies) * 1000
    print(
        json.dumps(
            {
                "benchmark": "load",
                "model": args.model,
                "clients": args.clients,
                "requests_per_client": args.requests,
                "images_per_request": args.images,
                "requests": args.clients * args.requests,
                "errors": errors,
                "latency_ms": {q: round(float(np.percentile(ms, int(q[1:]))), 1) for q in ("p50", "p90", "p99")},
                "images_per_s": round(len(latencies) * args.images / wall, 1),
                "mean_model_batch": round(batch_mean, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
