"""Medians of repeated timings, the one way every benchmark here times code (noisy machines: medians)."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved_medians(variants: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds of each variant; rounds interleave them, so the machine's drift hits all alike."""
    for fn in variants.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    return interleaved_medians({"": fn}, repeats)[""]
