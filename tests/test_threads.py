"""The trainer's CPU threads leave the cores other processes are running on."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from trainer.threads import fit_threads, others_running

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads /proc/stat (Linux)")


def test_a_busy_process_takes_a_thread_away():
    cores = len(os.sched_getaffinity(0))
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    before = torch.get_num_threads()
    try:
        time.sleep(0.5)  # until it runs
        assert others_running() >= 1
        threads = fit_threads()
        assert threads == torch.get_num_threads() and 1 <= threads <= max(1, cores - 1)
    finally:
        hog.kill()
        hog.wait()
        torch.set_num_threads(before)
