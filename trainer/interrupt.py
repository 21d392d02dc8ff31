"""Stopping a run so that it resumes: Ctrl-C at a terminal, SIGTERM from a scheduler. Either way the exact
command that resumes the run is printed.

**Ctrl-C** (one process). During an epoch's updates the first Ctrl-C is deferred: the updates finish, the
epoch is checkpointed, and the run stops (a second Ctrl-C stops at once). During sampling or while waiting
for rewards the weights are still those of the last finished epoch, so that epoch is checkpointed (if it is
not already) with the RNG streams and counters as they were when it ended: the resumed run continues
exactly. With several processes a Ctrl-C reaches each at a different point of the epoch, and saving is a
collective: there the run stops at once, and the newest checkpoint is the one to resume from.

**SIGTERM** is what Kubernetes (after terminationGracePeriodSeconds, 30 s by default), Slurm (KillWait, 30 s
by default; ``--signal`` sends it earlier) and torchrun / accelerate launch (which forward it to every process
and kill after ``--shutdown_timeout``, 30 s) send before they kill. The run has ``run.stop_grace_s`` from the
first SIGTERM:

- during an epoch's updates (a step's, for the algorithms counted in steps) they finish and the epoch is
  checkpointed, as long as that leaves the time the last checkpoint took to write; when the grace period runs
  out first, the updates stop where they are and nothing is saved (the weights are then neither epoch's): the
  newest checkpoint on disk is the one to resume from;
- anywhere else the last finished epoch is checkpointed (if it is not already), as after Ctrl-C.

Then ``Stopped`` is raised; ``python -m trainer`` exits with 143 (128 + SIGTERM). A second SIGTERM changes
nothing (Slurm signals every process of a step and the launcher forwards its own).

With several processes a checkpoint is written by all of them, so all must stop at the same point. A process
that receives SIGTERM only notes it; at each sampling batch, at the start of an epoch's updates, at each
optimizer step and at each epoch's end the processes agree on what they noted (an all-reduce, the most urgent
wins): go on, stop there, or, during the updates, give up on them. A SIGTERM that reaches one process only
(one machine drained) stops them all. With one process SIGTERM outside the updates stops at once, as Ctrl-C.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

# What a process has noted, in rising urgency: the largest over the processes is what they all do.
GOING_ON, ASKED, LATE = 0, 1, 2  # LATE: SIGTERM, and its grace period will not hold the updates and a save


class Stopped(KeyboardInterrupt):
    """SIGTERM stopped the run where every process agreed, after saving what it could (``Interrupts``)."""

    exit_status = 128 + signal.SIGTERM


def max_over_processes(accelerator) -> Callable[[int], int]:
    """The largest of a number over the processes (a collective: every process calls it alike). On CPU
    tensors over gloo, so that it never waits for a GPU: a group of its own when the run's backend is NCCL."""
    if accelerator.num_processes == 1:
        return lambda value: value
    import torch
    import torch.distributed as dist

    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def largest(value: int) -> int:
        noted = torch.tensor([value])
        dist.all_reduce(noted, op=dist.ReduceOp.MAX, group=group)
        return int(noted)

    return largest


class Interrupts:
    def __init__(self, out: Path, accelerator, grace_s: float):
        self.out, self.num_processes, self.grace_s = Path(out), accelerator.num_processes, grace_s
        self.is_main = accelerator.is_main_process
        main_thread = threading.current_thread() is threading.main_thread()
        self.enabled = self.num_processes == 1 and main_thread  # Ctrl-C's deferral
        self.requested = False  # Ctrl-C during the updates
        self.save_last: Callable[[], Path] | None = None  # saves the last finished epoch while its weights are current
        self.updates = False  # between updating() and epoch_done(): the weights are moving
        self.terminated_at: float | None = None  # time.monotonic() of the first SIGTERM
        self.save_seconds = 0.0  # how long the last checkpoint took: kept free at the grace period's end
        self.stopping = False
        self._said = False
        self._largest = max_over_processes(accelerator)
        self._previous = None
        self._term_installed = main_thread
        if main_thread:  # (None: a handler installed outside Python, which cannot be put back: the default then)
            self._previous_term = signal.signal(signal.SIGTERM, self._on_sigterm) or signal.SIG_DFL

    def _on_sigterm(self, signum, frame) -> None:
        if self.terminated_at is None:
            self.terminated_at = time.monotonic()
        if self.num_processes == 1 and not self.updates and not self.stopping:
            self.stopping = True  # nothing to agree on: stop now, as Ctrl-C does
            raise Stopped("SIGTERM: stopping")

    def _noted(self) -> int:
        if self.terminated_at is None:
            return GOING_ON
        late = time.monotonic() + self.save_seconds >= self.terminated_at + self.grace_s
        return LATE if late else ASKED

    def check(self) -> None:
        """A point where every process stops alike (a collective with several): outside the updates on any
        SIGTERM, during them when its grace period has run out."""
        agreed = self._largest(self._noted())
        if agreed == GOING_ON:
            return
        if self.updates and agreed == ASKED:
            if not self._said and self.is_main:
                print(
                    f"\nSIGTERM: finishing this epoch's updates within run.stop_grace_s ({self.grace_s:g} s), "
                    "then saving a checkpoint",
                    file=sys.stderr,
                    flush=True,
                )
            self._said = True
            return
        self.stopping = True
        if self.updates:
            raise Stopped(
                f"SIGTERM: run.stop_grace_s ({self.grace_s:g} s) ran out before this epoch's updates finished: "
                "they are dropped, nothing is saved"
            )
        raise Stopped("SIGTERM: stopping")

    def updating(self) -> None:
        """The weights start to move: Ctrl-C and SIGTERM now wait for the epoch's end."""
        self.check()  # a SIGTERM that came while sampling or scoring stops here, before the weights move
        self.save_last, self.updates = None, True
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

    def epoch_done(self, save: Callable[[], Path], due: bool) -> None:
        """The epoch ended: ``save`` checkpoints it, now when ``due``, else later if a stop asks for it.
        Stops here if asked to."""
        self.restore()
        if due:
            start = time.monotonic()
            save()
            self.save_seconds = time.monotonic() - start
        self.save_last, self.updates = (None if due else save), False
        if self.requested:
            raise KeyboardInterrupt
        self.check()

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def close(self) -> None:
        self.restore()
        if self._term_installed:
            signal.signal(signal.SIGTERM, self._previous_term)
            self._term_installed = False

    def interrupted(self, exc: KeyboardInterrupt) -> None:
        """After a KeyboardInterrupt or ``Stopped``: checkpoint the last finished epoch if that is still
        possible (with several processes only after a stop they agreed on); say how to resume."""
        self.restore()
        self.stopping = True
        agreed = isinstance(exc, Stopped)
        if agreed and self.is_main:
            saving = "; saving the last finished epoch" if self.save_last is not None else ""
            print(f"\n{exc}{saving}", file=sys.stderr, flush=True)
        if (self.enabled or agreed) and self.save_last is not None:
            self.save_last()
        if not self.is_main:
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
