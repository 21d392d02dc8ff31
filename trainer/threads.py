"""CPU threads that leave room for the machine's other work.

On a CPU, torch runs one OpenMP thread per core, and its threads spin at each barrier waiting for the
others. When another busy process holds a core, the thread that lost it holds every barrier up while the
rest spin: measured here on 2 cores next to one CPU-bound process, the tiny run's epochs went from 4 s to
25-130 s. Using only the cores nobody else is running on avoids that; the count is looked at again at every
epoch, so a reward server that starts (or stops) scoring next to the trainer is taken into account.
"""

from __future__ import annotations

import os
import time


def others_running(samples: int = 10, interval_s: float = 0.01) -> int | None:
    """Runnable tasks on the machine besides the calling thread (the least of a few looks at /proc/stat's
    procs_running, so that a moment's burst does not count); None where /proc/stat is not there."""
    counts = []
    for _ in range(samples):
        try:
            with open("/proc/stat") as f:
                counts += [int(line.split()[1]) for line in f if line.startswith("procs_running")]
        except OSError:
            return None
        time.sleep(interval_s)
    return max(0, min(counts) - 1) if counts else None


def fit_threads() -> int:
    """Set torch's intra-op threads to the cores nobody else is running on (at least 1); returns the count."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    others = others_running()
    threads = cores if others is None else max(1, cores - others)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return threads
