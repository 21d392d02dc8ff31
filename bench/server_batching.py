"""Dynamic batching under many clients: images/s with batching vs ``--max-batch 1``.

    python -m bench.server_batching [--seconds 6]

Serves ``clipscore`` on a CLIP built offline at a size where the per-call cost matters on CPU (ViT and text
tower of 12 layers, width 384, 64 px images in 16 patches), in a real reward-server subprocess. 1, 4 and 16 concurrent
clients each send single-image requests back to back for a fixed time. Prints JSON with images/s and the
batched / unbatched ratio per client count (target: >= 4x at 16 clients).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import numpy as np

SPEC = {"seed": 5, "hidden": 384, "layers": 12, "heads": 6, "image_size": 64, "patch": 16, "projection": 128}


async def clients(url: str, n: int, seconds: float, image: np.ndarray) -> float:
    from protocol import RewardClient

    client = RewardClient(url)
    done = 0
    stop = time.perf_counter() + seconds

    async def one() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await client.score(image[None], ["a photo of a cat"])
            done += 1

    await client.score(image[None], ["warm-up"])
    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    rate = done / (time.perf_counter() - start)
    await client.aclose()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--max-wait-ms", type=float, default=20.0)
    args = parser.parse_args()

    from reward_servers.tiny_models import build_clip
    from tests.conftest import ServerProcess

    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    result = {"benchmark": "server_batching", "scorer": "clipscore", "model": SPEC, "seconds_per_point": args.seconds, "max_wait_ms": args.max_wait_ms}
    with tempfile.TemporaryDirectory() as tmp:
        build_clip(Path(tmp) / "clip", SPEC)
        rates = {}
        for label, max_batch in (("batched", "32"), ("max_batch_1", "1")):
            server = ServerProcess(
                "--model", "clipscore", "--checkpoint", str(Path(tmp) / "clip"), "--max-batch", max_batch,
                "--max-wait-ms", str(args.max_wait_ms), log=Path(tmp) / f"{label}.log",
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
    result["images_per_s"] = {label: {str(n): round(r, 1) for n, r in v.items()} for label, v in rates.items()}
    result["ratio_batched_vs_max_batch_1"] = {str(n): round(rates["batched"][n] / rates["max_batch_1"][n], 2) for n in (1, 4, 16)}
    result["target"] = ">= 4x at 16 clients"
    print(json.dumps(result))


if __name__ == "__main__":
    main()
