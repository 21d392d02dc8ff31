"""How an epoch divides into sampling batches, denoiser forwards and optimizer steps, checked before any
model loads (ddpo-pytorch's batch arithmetic)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from trainer.config import Config


class BatchPlanError(ValueError):
    pass


@dataclass(frozen=True)
class BatchPlan:
    """How an epoch divides into sampling batches and optimizer steps, as in ddpo-pytorch."""

    num_processes: int
    samples_per_epoch: int
    effective_train_batch: int
    train_timesteps: int
    optimizer_steps_per_epoch: int
    step_groups: tuple[slice, ...]  # the trained timesteps of a batch, split into denoiser forwards

    @classmethod
    def of(cls, cfg: Config, num_processes: int) -> "BatchPlan":
        s, t = cfg.sample, cfg.train
        problems = []
        if s.batch_size < t.batch_size or s.batch_size % t.batch_size:
            problems.append(
                f"sample.batch_size ({s.batch_size}) must be a multiple of train.batch_size ({t.batch_size})"
            )
        samples = s.batch_size * num_processes * s.num_batches_per_epoch
        effective = t.batch_size * num_processes * t.gradient_accumulation_steps
        if samples % effective:
            problems.append(
                f"samples per epoch = sample.batch_size x processes x sample.num_batches_per_epoch = "
                f"{s.batch_size} x {num_processes} x {s.num_batches_per_epoch} = {samples} must be a multiple of "
                f"the effective train batch = train.batch_size x processes x train.gradient_accumulation_steps = "
                f"{t.batch_size} x {num_processes} x {t.gradient_accumulation_steps} = {effective}"
            )
        if problems:
            raise BatchPlanError("batch sizes do not fit:\n  " + "\n  ".join(problems))
        return cls(
            num_processes,
            samples,
            effective,
            cls.train_timesteps_of(cfg),
            samples // effective * t.num_inner_epochs,
            cls.step_groups_of(cfg),
        )

    @staticmethod
    def train_timesteps_of(cfg: Config) -> int:
        from trainer.algorithms import ALGORITHMS

        algorithm = ALGORITHMS[cfg.algorithm]
        if algorithm.trained_steps is not None:  # DGPO's dgpo.num_timesteps
            return algorithm.trained_steps(cfg)
        stochastic = algorithm.stochastic_steps(cfg)  # DDPO's window, or every step
        return max(1, int(stochastic * cfg.train.timestep_fraction))

    @classmethod
    def step_groups_of(cls, cfg: Config, k: int | None = None) -> tuple[slice, ...]:
        """``k`` trained timesteps per forward: ``train.timesteps_per_forward``; 0 means all of them (on a GPU
        the run then measures how many fit, see ``fits``, and re-plans with ``k``)."""
        total = cls.train_timesteps_of(cfg)
        k = k or cfg.train.timesteps_per_forward or total
        return tuple(slice(j, min(j + k, total)) for j in range(0, total, k))

    def with_timesteps_per_forward(self, cfg: Config, k: int) -> "BatchPlan":
        return replace(self, step_groups=self.step_groups_of(cfg, k))

    def describe(self) -> str:
        return (
            f"{self.samples_per_epoch} samples per epoch on {self.num_processes} process(es); effective train "
            f"batch {self.effective_train_batch}; {self.optimizer_steps_per_epoch} optimizer steps per epoch, "
            f"each over {self.train_timesteps} timesteps in {len(self.step_groups)} forward(s) per batch"
        )


def on_accelerator() -> bool:
    """Whether the run trains on a GPU (CUDA or MPS), as accelerate will place it; otherwise on the CPU."""
    import torch

    return torch.cuda.is_available() or torch.backends.mps.is_available()


def fits(peak_bytes: Callable[[int], int], total: int, budget_bytes: int) -> int:
    """The most trained timesteps per forward (1 to ``total``) whose peak memory stays within the budget.

    ``peak_bytes(k)`` measures one training forward and backward of k timesteps. Activations grow linearly
    with the batch, so peaks at k = 1 and 2 give the fixed part and the cost of each further timestep."""
    one = peak_bytes(1)
    if total == 1 or one >= budget_bytes:
        return 1
    per_timestep = max(peak_bytes(2) - one, 1)
    return max(1, min(total, 1 + (budget_bytes - one) // per_timestep))
