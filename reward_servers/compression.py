"""JPEG (in)compressibility rewards, as ddpo-pytorch defines them: the JPEG size at quality 95 in kB."""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from reward_servers.scorer import ScoreOutput, Scorer


def jpeg_size_kb(image: np.ndarray, quality: int = 95) -> float:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.tell() / 1000


class JpegIncompressibility(Scorer):
    name = "incompressibility"
    description = "JPEG size at quality 95 in kB (bytes / 1000); higher = less compressible"
    max_batch = 256
    sign = 1.0

    def __init__(self, quality: int = 95, workers: int | None = None):
        self.quality = quality
        # Pillow releases the GIL while encoding, so threads spread JPEG work over the cores.
        self.workers = workers or min(8, os.cpu_count() or 1)
        self._pool: ThreadPoolExecutor | None = None

    def load(self, device: str = "cpu") -> None:
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="jpeg")

    def score(self, images, prompts, metadata) -> ScoreOutput:
        sizes = self._pool.map(lambda image: jpeg_size_kb(image, self.quality), images) if self._pool else (
            jpeg_size_kb(image, self.quality) for image in images
        )
        sizes = np.fromiter(sizes, dtype=np.float64, count=len(images))
        return ScoreOutput(scores=self.sign * sizes, info={"jpeg_kb": sizes.tolist()})


class JpegCompressibility(JpegIncompressibility):
    name = "compression"
    description = "minus the JPEG size at quality 95 in kB (bytes / 1000); higher = more compressible"
    sign = -1.0
