"""The run set-up every algorithm shares, so that each algorithm file is only its own loop.

``started`` opens a run: the accelerator, every pre-flight check, the checkpoint to resume from, the run
folder (refused if it holds another run: trainer/run_folder.py) and trackers, seeds, prompts, rewards, and
Ctrl-C and SIGTERM handling (trainer/interrupt.py); whatever ends the run, the reward clients stop and the
trackers flush. It yields a ``Run``: what exists before the model loads, built whole.
``load_model`` then loads the model family and makes it trainable (LoRA or full), with the optimizer, LR
schedule, EMA and the resumed state, and returns them as a ``Trained``. ``log_epoch``, ``end_epoch``
(checkpoint) and ``finish`` (save and publish the weights) close each epoch and the run.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch

from trainer import checkpoint, preflight, run_folder, sharding, tracking
from trainer.config import Config, RewardConfig
from trainer.ema import EMA
from trainer.families import Family
from trainer.families.models import adapters_disabled, frozen_copy, load_family, make_trainable, save_weights
from trainer.interrupt import Interrupts
from trainer.optimizer import make_optimizer
from trainer.plan import BatchPlan, fits, on_accelerator
from trainer.prompts import make_prompt_fn, user_prompt_fn
from trainer.rewards import Rewards, run_components
from trainer.threads import fit_threads

if TYPE_CHECKING:
    from accelerate import Accelerator


@dataclass
class Evaluations:
    """What the run's evaluations (trainer/evaluate.py, ``evaluate_run``) keep from one to the next."""

    first: tuple[int, np.ndarray, np.ndarray] | None = None  # this process's first: (epochs, images, rewards)
    scorer: Rewards | None = None  # run.eval_scorer's, loaded at the first evaluation (``rewards``)

    def rewards(self, scorer: str, device: torch.device) -> Rewards:
        """The rewards of run.eval_scorer ``scorer``: loaded at the first call, kept for the others."""
        if self.scorer is None:
            self.scorer = Rewards(RewardConfig(scorer=scorer), device=str(device))
        return self.scorer

    def close(self) -> None:
        if self.scorer is not None:
            self.scorer.close()


@dataclass(frozen=True)
class Run:
    """What a run holds before its model loads (``started`` builds it whole); the model is ``load_model``'s."""

    cfg: Config
    accelerator: Accelerator
    plan: BatchPlan  # as the config says; DDPO re-plans its own copy (fit_timesteps_per_forward)
    out: Path
    rewards: Rewards
    prompt_fn: Callable
    prompt_rng: np.random.Generator
    interrupts: Interrupts  # Ctrl-C and SIGTERM
    resume: Path | None
    start: int  # epochs done, or optimizer steps for the step-counted algorithms (a resumed run's checkpoint)
    history: list[dict] = field(default_factory=list)  # every logged record (log_epoch), what ``finish`` returns
    evaluations: Evaluations = field(default_factory=Evaluations)

    def fit_threads(self) -> int:
        """On a CPU, the torch threads for the coming epoch (trainer/threads.py); the count in use."""
        if (
            self.accelerator.device.type == "cpu"
            and not self.cfg.run.cpu_threads
            and "OMP_NUM_THREADS" not in os.environ
        ):
            return fit_threads()
        return torch.get_num_threads()


@dataclass(frozen=True)
class Trained:
    """The model ``load_model`` loaded and made trainable, and what trains it."""

    family: Family
    model: torch.nn.Module  # the trained denoiser as accelerate prepared it (DDP-wrapped on several processes)
    policy: torch.nn.Module  # the same denoiser unwrapped: sampling and the no-gradient references use it
    trainable: dict[str, torch.nn.Parameter]  # the same tensors the optimizer, EMA and checkpoints see
    optimizer: torch.optim.Optimizer  # accelerate's wrapper of it
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: EMA | None  # with train.ema_decay
    old_policy: EMA | None  # a lagging average of the trainable weights: DiffusionNFT's old policy, AWM's
    resumed: dict[str, Any]  # the checkpoint's plain state ({} for a fresh run): global_step, the algorithm's own
    frozen: torch.nn.Module | None  # full finetuning with train.kl_coef: the base's frozen copy

    def base(self) -> contextlib.AbstractContextManager[torch.nn.Module]:
        """The base model, the KL's reference: the frozen copy, or the denoiser with its LoRA adapters off."""
        return contextlib.nullcontext(self.frozen) if self.frozen is not None else adapters_disabled(self.policy)


def fit_timesteps_per_forward(run: Run, trained: Trained, forward: Callable[[int], torch.Tensor]) -> BatchPlan:
    """The batch plan to train with: ``run.plan``, or with ``train.timesteps_per_forward 0`` on a CUDA GPU as
    many trained timesteps per forward as its memory holds, measured on a real training batch at 1 and 2
    timesteps (``forward(k)``: the algorithm's training forward of k timesteps, a tensor to backpropagate); the
    smallest count of all processes, so each runs as many forwards. Sets accelerate's accumulation to match.
    Called once per run, on its first training batch."""
    cfg, accelerator, plan = run.cfg, run.accelerator, run.plan
    if cfg.train.timesteps_per_forward or accelerator.device.type != "cuda" or plan.train_timesteps == 1:
        return plan

    def peak_bytes(k: int) -> int:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with accelerator.no_sync(trained.model):  # a probe: no gradient all-reduce, and its gradients dropped
            accelerator.backward(forward(k).sum() * 0)
        trained.optimizer.zero_grad(set_to_none=True)
        return torch.cuda.max_memory_allocated()

    free, _ = torch.cuda.mem_get_info()
    # AdamW's two moments are allocated at the first optimizer step, after this probe (fp32, as trained).
    moments = 0 if trained.optimizer.state else sum(8 * p.numel() for p in trained.trainable.values())
    budget = int(0.9 * (free + torch.cuda.memory_reserved())) - moments  # 10% for fragmentation, KL forwards
    k = fits(peak_bytes, plan.train_timesteps, budget)
    k = int(accelerator.gather(torch.tensor([k], device=accelerator.device)).min())
    plan = plan.with_timesteps_per_forward(cfg, k)
    accelerator.gradient_accumulation_steps = cfg.train.gradient_accumulation_steps * len(plan.step_groups)
    accelerator.print(
        f"train.timesteps_per_forward {k}: {k * cfg.train.batch_size} samples per forward fit "
        f"in {budget / 2**30:.1f} GiB (measured); batch plan: {plan.describe()}"
    )
    return plan


@contextlib.contextmanager
def started(cfg: Config, accumulation_steps: int, reward_fn=None, prompt_fn=None) -> Iterator[Run]:
    """``accumulation_steps``: backward passes per optimizer step (the algorithm knows how many)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    out = Path(cfg.run.output_dir)
    run_folder.check_same_run(cfg)  # before anything loads or is written (and before any process writes config.json)
    accelerator = Accelerator(
        # Without a GPU, several processes must be told to use CPU (gloo); with one, accelerate picks it.
        cpu=not on_accelerator(),
        mixed_precision=cfg.run.mixed_precision,
        gradient_accumulation_steps=accumulation_steps,
        log_with=None if cfg.run.log_with == "none" else cfg.run.log_with,
        project_dir=out,
    )
    # Every problem of the config, its models, files and reward servers at once, before any model loads.
    components = run_components(cfg.reward, reward_fn)  # a Python reward_fn becomes a scorer here, once
    plan = preflight.check(cfg, accelerator.num_processes, accelerator.device.type, components)
    accelerator.print(f"batch plan: {plan.describe()}")
    # The checkpoint is chosen (and verified) first: a damaged one fails before any model loads, and the
    # logs are trimmed to its epoch before anything is logged.
    resume, start = run_folder.resume_point(accelerator, cfg)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        run_folder.write_config(cfg, out)
        if resume is not None or cfg.run.resume_from == "auto":  # auto's fresh start drops a checkpointless try's logs
            tracking.trim_logs(out, start)
        tracking.start_trackers(accelerator, cfg, start)
    if cfg.run.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    if cfg.run.cpu_threads:
        torch.set_num_threads(cfg.run.cpu_threads)
    set_seed(cfg.run.seed, device_specific=True)
    prompt_rng = np.random.default_rng([cfg.run.seed, accelerator.process_index])
    prompt_fn = user_prompt_fn(prompt_fn) if prompt_fn is not None else make_prompt_fn(cfg.prompt.fn, cfg.prompt.path)
    rewards = run = None
    interrupts = Interrupts(out, accelerator, cfg.run.stop_grace_s)
    # Whatever ends the run (an error, Ctrl-C, SIGTERM), the reward clients' threads and event loops stop and the
    # trackers flush; the newest checkpoint stays the last complete one (checkpoint.save renames it into place).
    try:
        # Local scorers load here, on the training device: their errors come before the big models.
        rewards = Rewards(cfg.reward, device=str(accelerator.device), components=components)
        run = Run(cfg, accelerator, plan, out, rewards, prompt_fn, prompt_rng, interrupts, resume, start)
        yield run
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM's Stopped
        interrupts.interrupted(exc)
        raise
    finally:
        interrupts.close()
        try:
            if rewards is not None:
                rewards.close()
            if run is not None:
                run.evaluations.close()
        finally:
            accelerator.end_training()


def load_model(
    run: Run, optimizer_steps: int, learning_rate: float | None = None, lagging: bool = False, reference: bool = False
) -> Trained:
    """Load the family, make it trainable, build the optimizer (at ``learning_rate``, default
    train.learning_rate), LR schedule (over ``optimizer_steps``) and EMA, and restore a checkpoint when
    resuming. ``lagging``: the algorithm keeps lagging weights (DiffusionNFT's old policy, AWM's lagging
    average), whose decay it sets per epoch; made here so that a resumed run loads them with the rest.
    ``reference``: the algorithm compares with the base model whatever train.kl_coef (Diffusion-DPO); a full
    finetune then keeps the base's frozen copy (``Trained.frozen``, sharded like the denoiser)."""
    cfg, accelerator = run.cfg, run.accelerator
    # One process builds the tiny model (save_pretrained writes weights only on rank 0 once torch.distributed
    # is up, so a build elsewhere would be empty); the others load it after.
    with accelerator.main_process_first():
        family = load_family(cfg, accelerator.device)
    accelerator.print(f"model: {family.pipe.name_or_path}")  # where the tiny model was built, or the checkpoint loaded
    denoiser = family.denoiser
    frozen = frozen_copy(denoiser, cfg, reference)  # before anything trains
    trainable = make_trainable(denoiser, cfg)
    if cfg.train.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    if cfg.run.channels_last:
        denoiser.to(memory_format=torch.channels_last)
    if cfg.run.sharding != "none":  # before compiling: each FSDP unit compiles with its hooks
        trainable = sharding.shard_trainable(family, trainable, cfg, accelerator)
        if frozen is not None:
            sharding.shard(frozen, family.shard_blocks, cfg, accelerator.device.type)
    if cfg.run.compile:
        # in place (nn.Module.compile): the same module object samples, trains and, adapters off, gives the KL
        # reference, so every path runs compiled and accelerate's unwrap_model still finds it
        denoiser.compile(backend=cfg.run.compile)
    optimizer = make_optimizer(cfg, list(trainable.values()), learning_rate)
    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler(  # stepped once per optimizer step, on every process alike
        cfg.train.lr_scheduler,
        optimizer,
        num_warmup_steps=cfg.train.lr_warmup_steps,
        num_training_steps=optimizer_steps,
    )
    if sharding.any_sharded(trainable):
        model, optimizer = denoiser, accelerator.prepare(optimizer)  # FSDP2 in place of accelerate's DDP
    else:
        model, optimizer = accelerator.prepare(denoiser, optimizer)  # DDP-wrapped on several processes
    ema = EMA(trainable, cfg.train.ema_decay) if cfg.train.ema_decay else None
    old_policy = EMA(trainable, 0.0) if lagging else None
    resumed = {}
    if run.resume is not None:
        resumed = checkpoint.load(
            accelerator,
            run.resume,
            params=trainable,
            optimizer=optimizer,
            prompt_rng=run.prompt_rng,
            ema=ema,
            old_policy=old_policy,
            model=denoiser,
        )
        lr_scheduler.load_state_dict(resumed["lr_scheduler"])
        accelerator.print(f"resumed from {run.resume} (epoch {run.start}, step {resumed['global_step']})")
    policy = accelerator.unwrap_model(model)
    return Trained(family, model, policy, trainable, optimizer, lr_scheduler, ema, old_policy, resumed, frozen)


def log_epoch(run: Run, metrics: dict, components: dict[str, np.ndarray], samples: list[dict]) -> None:
    """The epoch's metrics to the history, the trackers and metrics.jsonl; its samples to samples.jsonl.
    (DPO logs per optimizer step: its records have "step" in place of "epoch".)"""
    accelerator, epoch = run.accelerator, metrics.get("epoch", metrics.get("step"))
    run.history.append(metrics)
    accelerator.log(metrics, step=epoch)
    board = tracking.tensorboard(accelerator)
    if board is not None:
        for name, r in components.items():
            board.add_histogram(f"reward/{name}", r, epoch)
    if accelerator.is_main_process:
        with open(run.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        with open(run.out / "samples.jsonl", "a") as f:  # every sample's prompt, reward and scorer info
            f.writelines(json.dumps(sample) + "\n" for sample in samples)


def backward_and_step(run: Run, trained: Trained, loss: torch.Tensor, stats: dict[str, list]) -> None:
    """Inside ``accelerator.accumulate``: backward, and where the accumulation ends clip the gradients (their
    norm into ``stats``), step the optimizer, the LR schedule and the EMA (accelerate's optimizer skips the
    steps in between)."""
    accelerator, trainable = run.accelerator, trained.trainable
    sharding.set_gradient_sync(trained.model, accelerator.sync_gradients, run.cfg.train.lora)
    accelerator.backward(loss)
    if accelerator.sync_gradients:
        norm = accelerator.clip_grad_norm_(trainable.values(), run.cfg.train.max_grad_norm)
        stats["grad_norm"].append(sharding.whole(norm))
    trained.optimizer.step()
    if accelerator.sync_gradients:
        trained.lr_scheduler.step()
        if trained.ema is not None:
            trained.ema.update(trainable)
        run.interrupts.check()  # every process alike: SIGTERM's grace period may end the updates here
    trained.optimizer.zero_grad()


def weights_spread(accelerator: Accelerator, trainable: dict[str, torch.nn.Parameter]) -> float:
    """0 when every process holds the same weights; above 0 means gradients were not synchronised."""
    # (sharded weights are one copy by construction: their sums are gathered whole, the same on every process)
    checksum = torch.stack([sharding.whole(p.detach().double().sum()) for p in trainable.values()]).sum().reshape(1)
    sums = accelerator.gather(checksum.to(accelerator.device))
    return float(sums.max() - sums.min())


def end_epoch(
    run: Run,
    trained: Trained,
    done: int,
    state: dict[str, Any],
    total: int | None = None,
    every: int | None = None,
) -> None:
    """Checkpoint after ``done`` epochs when it is due (every ``every``, default run.save_freq, and at
    ``total``, default run.num_epochs: DPO counts optimizer steps); otherwise keep what a stop would save.
    ``state``: the plain counters to resume (``global_step`` and the algorithm's own)."""
    cfg = run.cfg
    total = cfg.run.num_epochs if total is None else total
    every = cfg.run.save_freq if every is None else every
    save = functools.partial(  # bound now: what the epoch ended with, should a stop ask for it later
        checkpoint.save,
        run.accelerator,
        run.out,
        done,
        cfg.run.checkpoint_limit,
        params=trained.trainable,
        optimizer=trained.optimizer,
        state={**state, "lr_scheduler": trained.lr_scheduler.state_dict()},
        prompt_rng=run.prompt_rng,
        ema=trained.ema,
        rng=checkpoint.rng_state(run.prompt_rng),
        old_policy=trained.old_policy,
        model=trained.policy,
    )
    run.interrupts.epoch_done(save, due=done == total or bool(every and done % every == 0))


def finish(run: Run, trained: Trained) -> list[dict]:
    """Save the trained weights (the EMA when kept) where diffusers loads them, and publish them if asked;
    returns every logged record."""
    cfg, accelerator = run.cfg, run.accelerator
    accelerator.wait_for_everyone()
    if trained.ema is not None:
        trained.ema.copy_to(trained.trainable)  # the published weights are the average
    gathered = None  # a sharded denoiser's weights, gathered whole once, to the main process
    if sharding.any_sharded(trained.trainable):
        gathered = sharding.gathered_state_dict(trained.policy, trainable_only=cfg.train.lora)
    if accelerator.is_main_process:
        where = save_weights(trained.family, cfg, run.out, gathered)
        accelerator.print(f"saved weights to {where}")
        if cfg.run.push_to_hub:
            from huggingface_hub import HfApi

            api = HfApi()
            api.create_repo(cfg.run.push_to_hub, exist_ok=True)
            api.upload_folder(
                repo_id=cfg.run.push_to_hub,
                folder_path=where,
                commit_message=f"{cfg.preset}: {cfg.run.num_epochs} epochs",
            )
            accelerator.print(f"uploaded {where} to {cfg.run.push_to_hub}")
    return run.history
