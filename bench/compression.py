"""The JPEG compression scorer's thread pool vs a plain single-threaded PIL loop, at 512 px.

    python -m bench.compression

Prints JSON: images/s of both and their ratio (Pillow releases the GIL while encoding, so the pool scales
with cores; this machine's core count is in the output).
"""

from __future__ import annotations

import json
import os

import numpy as np

from bench.timing import median_seconds
from scorers.compression import JpegCompressibility, jpeg_size_kb

N, SIZE, REPEATS = 64, 512, 5


def rate(fn) -> float:
    return N / median_seconds(fn, REPEATS)


def main() -> None:
    rng = np.random.default_rng(0)
    # Smooth images with some noise: JPEG work like a sampled image's, not like pure noise.
    base = np.linspace(0, 255, SIZE, dtype=np.float32)[None, :, None] * np.ones((SIZE, 1, 3), np.float32)
    images = np.stack([(base + rng.normal(0, 20, (SIZE, SIZE, 3))).clip(0, 255).astype(np.uint8) for _ in range(N)])
    scorer = JpegCompressibility()
    scorer.load()
    loop = rate(lambda: [jpeg_size_kb(image) for image in images])
    pooled = rate(lambda: scorer.score(images, [""] * N, [{}] * N))
    print(
        json.dumps(
            {
                "benchmark": "compression",
                "images": N,
                "size": SIZE,
                "cpu_count": os.cpu_count(),
                "workers": scorer.workers,
                "images_per_s": {"pil_loop": round(loop, 1), "scorer_pool": round(pooled, 1)},
                "ratio_pool_vs_loop": round(pooled / loop, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
