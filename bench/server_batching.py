"""Dynamic batching under many clients: images/s with batching vs ``--max-batch 1``.

    python -m bench.server_batching [--seconds 6]

Serves ``clipscore`` in a real reward-server subprocess on a CLIP built offline, deep and narrow (ViT and text
towers of 48 layers, width 64; 64 px images in 16 patches) so that, as for CLIP-L on a GPU, one image costs
nearly what a batch does: per-call overhead, not arithmetic, dominates a single image. (A wide model on
2 CPU cores is arithmetic-bound: CLIP at width 384 and 12 layers runs 16 images only 4.1x faster than 16 single
calls, which caps any server's batching gain there.) 1, 4 and 16 concurrent clients each send single-image
requests back to back for a fixed time. Prints JSON with images/s, the batched / unbatched ratio per client
count (target: >= 4x at 16 clients), and the model's own batch-16 vs batch-1 speed-up measured in-process,
the ceiling of that ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.timing import median_seconds

SPEC = {"seed": 5, "hidden": 64, "layers": 48, "heads": 2, "image_size": 64, "patch": 16, "projection": 64}


async def clients(url: str, n: int, seconds: float, image: np.ndarray) -> float:
    """``n`` clients, each its own RewardClient as each trainer process has, sending back to back."""
    from protocol import RewardClient

    pool = [RewardClient(url) for _ in range(n)]
    done = 0

    async def one(client: RewardClient, stop: float) -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await client.score(image[None], ["a photo of a cat"])
            done += 1

    await asyncio.gather(*(client.score(image[None], ["warm-up"]) for client in pool))
    start = time.perf_counter()
    await asyncio.gather(*(one(client, start + seconds) for client in pool))
    rate = done / (time.perf_counter() - start)
    await asyncio.gather(*(client.aclose() for client in pool))
    return rate


def model_ceiling(checkpoint: Path, image: np.ndarray, repeats: int = 5) -> float:
    """In-process: how much faster the scorer runs 16 images at once than one at a time (median times)."""
    from scorers.clip import ClipScore

    scorer = ClipScore(str(checkpoint))
    scorer.load("cpu")

    def seconds(n: int) -> float:
        images, prompts = np.repeat(image[None], n, axis=0), ["a photo of a cat"] * n
        return median_seconds(lambda: scorer.score(images, prompts, [{}] * n), repeats)

    return round(16 * seconds(1) / seconds(16), 2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--max-wait-ms", type=float, default=20.0)
    args = parser.parse_args()

    from scorers.tiny_models import build_clip
    from tests.conftest import ServerProcess

    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    result = {
        "benchmark": "server_batching",
        "scorer": "clipscore",
        "model": SPEC,
        "seconds_per_point": args.seconds,
        "max_wait_ms": args.max_wait_ms,
    }
    with tempfile.TemporaryDirectory() as tmp:
        build_clip(Path(tmp) / "clip", SPEC)
        rates = {}
        for label, max_batch in (("batched", "32"), ("max_batch_1", "1")):
            server = ServerProcess(
                "--model",
                "clipscore",
                "--checkpoint",
                str(Path(tmp) / "clip"),
                "--max-batch",
                max_batch,
                "--max-wait-ms",
                str(args.max_wait_ms),
                log=Path(tmp) / f"{label}.log",
            ).wait_ready(120)
            try:
                rates[label], mean_batch = {}, {}
                for n in (1, 4, 16):
                    before = server.metric("reward_batch_images_count"), server.metric("reward_batch_images_sum")
                    rates[label][n] = asyncio.run(clients(server.url, n, args.seconds, image))
                    count = server.metric("reward_batch_images_count") - before[0]
                    mean_batch[str(n)] = round((server.metric("reward_batch_images_sum") - before[1]) / count, 2)
                result[f"{label}_mean_batch_size"] = mean_batch
            finally:
                server.stop()
        ceiling = model_ceiling(Path(tmp) / "clip", image)
    result["images_per_s"] = {label: {str(n): round(r, 1) for n, r in v.items()} for label, v in rates.items()}
    result["ratio_batched_vs_max_batch_1"] = {
        str(n): round(rates["batched"][n] / rates["max_batch_1"][n], 2) for n in (1, 4, 16)
    }
    result["model_only_batch16_vs_batch1"] = ceiling
    result["target"] = ">= 4x at 16 clients"
    print(json.dumps(result))


if __name__ == "__main__":
    main()
