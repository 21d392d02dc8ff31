"""Ctrl-C that leaves a run resumable, and says how to resume it.

During an epoch's updates the first Ctrl-C is deferred: the updates finish, the epoch is checkpointed, and
the run stops (a second Ctrl-C stops at once). During sampling or while waiting for rewards the weights are
still those of the last finished epoch, so that epoch is checkpointed (if it is not already) with the RNG
streams and counters as they were when it ended: the resumed run continues exactly. Either way the exact
command that resumes the run is printed.

With several processes a Ctrl-C reaches each at a different point of the epoch, and saving is a collective:
there the run stops at once, and the newest checkpoint is the one to resume from.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Callable


class CtrlC:
    def __init__(self, out: Path, num_processes: int):
        self.out, self.num_processes = Path(out), num_processes
        self.enabled = num_processes == 1 and threading.current_thread() is threading.main_thread()
        self.requested = False
        self.save_last: Callable[[], Path] | None = None  # saves the last finished epoch while its weights are current
        self._previous = None

    def updating(self) -> None:
        """The weights start to move: Ctrl-C now waits for the epoch's end."""
        self.save_last = None
        if not self.enabled:
            return

        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            print(
                "\nCtrl-C: finishing this epoch's updates, then saving a checkpoint (Ctrl-C again to stop now)",
                file=sys.stderr,
                flush=True,
            )

        self._previous = signal.signal(signal.SIGINT, handler)

    def epoch_done(self, save_last: Callable[[], Path] | None) -> None:
        """The epoch ended; ``save_last`` checkpoints it (None: it already is). Stops here if asked to."""
        self.restore()
        self.save_last = save_last
        if self.requested:
            raise KeyboardInterrupt

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def interrupted(self, is_main: bool) -> None:
        """After a KeyboardInterrupt: checkpoint the last finished epoch if that is still possible; say how to
        resume."""
        self.restore()
        if self.enabled and self.save_last is not None:
            self.save_last()
        if not is_main:
            return
        from trainer.checkpoint import newest_first

        launcher = "python -m trainer" if self.num_processes == 1 else "accelerate launch -m trainer"
        newest = newest_first(self.out)
        if newest:
            print(
                f"\nstopped; {newest[0]} is the newest checkpoint. Resume with:\n  {launcher} --config "
                f"{self.out / 'config.json'} --run.resume_from {self.out}",
                file=sys.stderr,
                flush=True,
            )
        else:
            print(
                f"\nstopped before any epoch finished: nothing to resume; start again with:\n  {launcher} "
                f"--config {self.out / 'config.json'}",
                file=sys.stderr,
                flush=True,
            )
