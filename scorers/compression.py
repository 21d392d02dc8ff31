"""JPEG (in)compressibility rewards, as ddpo-pytorch defines them: the JPEG size at quality 95 in kB."""

from __future__ import annotations

import io
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from scorers.scorer import ScoreOutput, Scorer


def jpeg_size_kb(image: np.ndarray, quality: int = 95) -> float:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.tell() / 1000


_local = threading.local()


def jpeg_size_kb_unlocked(image: np.ndarray, quality: int = 95) -> float:
    """``jpeg_size_kb`` through an in-memory file descriptor: Pillow encodes to a real fd in one call with
    the GIL released, but to a BytesIO in chunks that hold it, so only the fd version scales with threads."""
    if not hasattr(os, "memfd_create"):
        return jpeg_size_kb(image, quality)
    if not hasattr(_local, "file"):
        _local.file = open(os.memfd_create("jpeg-size"), "w+b")
    file = _local.file
    file.seek(0)
    Image.fromarray(image).save(file, format="JPEG", quality=quality)
    return file.tell() / 1000


class JpegIncompressibility(Scorer):
    name = "incompressibility"
    description = "JPEG size at quality 95 in kB (bytes / 1000); higher = less compressible"
    max_batch = 256
    max_side = 65_500  # libjpeg's JPEG_MAX_DIMENSION: a longer side does not encode
    sign = 1.0

    def __init__(self, quality: int = 95, workers: int | None = None):
        self.quality = quality
        # With jpeg_size_kb_unlocked the encoding runs without the GIL, so threads use every core.
        self.workers = workers or min(8, os.cpu_count() or 1)
        self._pool: ThreadPoolExecutor | None = None

    def load(self, device: str = "cpu") -> None:
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="jpeg")

    def score(self, images, prompts, metadata) -> ScoreOutput:
        size = lambda image: jpeg_size_kb_unlocked(image, self.quality)  # noqa: E731
        sizes = self._pool.map(size, images) if self._pool else map(size, images)
        sizes = np.fromiter(sizes, dtype=np.float64, count=len(images))
        return ScoreOutput(scores=self.sign * sizes, info={"jpeg_kb": sizes.tolist()})


class JpegCompressibility(JpegIncompressibility):
    name = "compression"
    description = "minus the JPEG size at quality 95 in kB (bytes / 1000); higher = more compressible"
    sign = -1.0
