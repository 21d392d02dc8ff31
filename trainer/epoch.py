"""The phases of an online epoch that every reward-driven algorithm shares (DDPO and Flow-GRPO on per-step
log-probs, DiffusionNFT, AWM and DGPO on the forward process): sample the epoch's prompts in groups while each
batch is scored, turn the epoch's rewards into advantages, log. Each algorithm's file is its training phase and
the loop that calls these in order (``online_train`` makes its ``train``); the forward-process algorithms share
that loop too (``forward_epochs``), each handing it its rollout weights, its updates and what follows them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager

import numpy as np
import torch
from tqdm.auto import tqdm

from trainer import run as run_setup
from trainer import tracking
from trainer.advantages import PerPromptStatTracker, advantage_groups, kept_advantages
from trainer.config import Config
from trainer.evaluate import evaluate_run
from trainer.plan import BatchPlan
from trainer.rewards import Pending, RewardFn, dropped
from trainer.sampling import Trajectories, sample


@dataclass
class Collected:
    """One epoch's samples: trajectories (for the forward-process methods, only the clean latents: no step
    stored), per-batch views and images, their reward futures."""

    trajectories: Trajectories
    batches: list[Trajectories]
    images: list[np.ndarray]
    pending: Pending
    seconds: float


@dataclass
class Scored:
    """One epoch's rewards, gathered across processes, and this process's advantages."""

    rewards: np.ndarray  # every process's, combined over the reward components
    components: dict[str, np.ndarray]
    advantages: torch.Tensor  # this process's samples, float32 on its device
    samples: list[dict]  # the gathered per-sample records (prompt, scores, info, reward)
    wait_seconds: float
    reward_stats: dict[str, float] = field(default_factory=dict)  # normalised components, judge counts


@dataclass(frozen=True)
class Online:
    """What an online loop starts its epochs with: the loaded model (``trained``; sampling and the no-gradient
    references use its bare denoiser ``trained.policy``, training the possibly DDP-wrapped ``trained.model``),
    the per-prompt tracker, the optimizer steps done, the empty prompt's conditioning and the sampling
    resolution."""

    trained: run_setup.Trained
    tracker: PerPromptStatTracker | None
    global_step: int  # at the start: a resumed run's
    negative: object
    resolution: int


def start(run: run_setup.Run, lagging: bool = False) -> Online:
    """Load the model (a checkpoint's state when resuming) for an online algorithm's epochs; ``lagging``: with
    the lagging weights ``trained.old_policy`` (run.load_model)."""
    cfg = run.cfg
    trained = run_setup.load_model(run, run.plan.optimizer_steps_per_epoch * cfg.run.num_epochs, lagging=lagging)
    state = trained.resumed
    tracker = None
    if cfg.train.per_prompt_stat_tracking:
        tracker = PerPromptStatTracker(cfg.train.stat_buffer_size, cfg.train.stat_min_count)
        if state.get("tracker"):
            tracker.load_state_dict(state["tracker"])
    return Online(
        trained,
        tracker,
        state.get("global_step", 0),
        trained.family.encode_prompts([""]),
        cfg.sample.resolution or trained.family.native_resolution(),
    )


def collect(
    run: run_setup.Run,
    online: Online,
    epoch: int,
    eta: float,
    window: Callable[[], range | None] | None = None,
    store: bool = True,
) -> Collected:
    """Sample one epoch's batches with the bare denoiser ``online.trained.policy`` at noise ``eta``; each batch
    goes to the reward functions as reward.overlap says. ``window()``, when given, each batch's stochastic steps
    (DDPO's timestep window; by default all); ``store`` False keeps only the clean latents (sampling.sample)."""
    cfg, accelerator, family = run.cfg, run.accelerator, online.trained.family
    policy, negative, resolution = online.trained.policy, online.negative, online.resolution
    start = time.perf_counter()
    pending, batches, images = Pending(run.rewards), [], []
    size, k = cfg.sample.batch_size, cfg.sample.images_per_prompt
    drawn = [run.prompt_fn(run.prompt_rng) for _ in range(size * cfg.sample.num_batches_per_epoch // k)]
    epoch_prompts = [pair for pair in drawn for _ in range(k)]  # each prompt k times in a row: its group
    # Flow-GRPO's same_latent (flow_grpo issue 7): a group differs only by the sampler's noise.
    noise = (
        family.initial_latents(len(drawn), resolution, None, accelerator.device).repeat_interleave(k, dim=0)
        if cfg.sample.same_noise_per_group
        else None
    )
    quiet = not accelerator.is_local_main_process
    for b in tqdm(range(cfg.sample.num_batches_per_epoch), desc=f"epoch {epoch} sampling", disable=quiet, leave=False):
        run.interrupts.check()  # SIGTERM: every process stops before the same batch (trainer/interrupt.py)
        prompts, metadata = zip(*epoch_prompts[b * size : (b + 1) * size])
        with accelerator.autocast():
            batch, final = sample(
                family,
                policy,
                list(prompts),
                list(metadata),
                negative,
                cfg.sample.num_steps,
                eta,
                cfg.sample.guidance_scale,
                resolution,
                window=window() if window else None,
                noise=None if noise is None else noise[b * size : (b + 1) * size],
                store=store,
            )
        images.append(family.vae.to_uint8(final))
        batches.append(batch)
        if cfg.reward.overlap != "none":
            pending.add(run.rewards.submit(images[-1], batch.prompts, batch.metadata))
            pending.raise_if_failed()
    if cfg.reward.overlap == "none":  # TRL's order: score only once everything is sampled
        for array, batch in zip(images, batches):
            pending.add(run.rewards.submit(array, batch.prompts, batch.metadata))
    return Collected(Trajectories.cat(batches), batches, images, pending, time.perf_counter() - start)


def score(
    run: run_setup.Run, epoch: int, collected: Collected, tracker: PerPromptStatTracker | None, image_samples_hook=None
) -> Scored:
    """Wait for the epoch's rewards, gather them across processes and turn them into advantages (within each
    group of sample.images_per_prompt, or per prompt with the tracker); show the samples when due."""
    from accelerate.utils import gather_object

    cfg, accelerator = run.cfg, run.accelerator
    t0 = time.perf_counter()
    scored = collected.pending.wait(cfg.reward.deadline)
    wait = time.perf_counter() - t0
    components = {
        name: accelerator.gather(torch.as_tensor(out.scores, device=accelerator.device)).cpu().numpy()
        for name, out in scored.items()
    }
    prompts = collected.trajectories.prompts
    prompts_all = gather_object(prompts)
    groups = advantage_groups(prompts_all, cfg.sample.images_per_prompt, cfg.train.group_by)
    rewards = run.rewards.combine(components, groups)  # groups: for reward.aggregation gdpo
    samples = gather_object(tracking.sample_records(epoch, accelerator.process_index, prompts, scored))
    for record, reward in zip(samples, rewards):  # gathered in the same (process-major) order
        record["reward"] = float(reward)
    # a sample a scorer dropped (a VLM judge with no usable answer, scorers/vlm.py) gets no advantage
    drop = dropped(samples, list(components))
    advantages = kept_advantages(rewards, prompts_all, tracker, groups, cfg.train.group_std == "global", drop)
    mine = advantages.reshape(accelerator.num_processes, -1)[accelerator.process_index]

    last = epoch == cfg.run.num_epochs - 1  # the final epoch's grid is always kept
    sheet = bool(cfg.run.log_images_every) and (epoch % cfg.run.log_images_every == 0 or last)
    if image_samples_hook is not None or sheet:
        tracking.show_samples(
            accelerator, run.out, epoch, collected.images, collected.batches, scored, rewards, image_samples_hook, sheet
        )
    return Scored(
        rewards,
        components,
        torch.as_tensor(mine, device=accelerator.device, dtype=torch.float32),
        samples,
        wait,
        run.rewards.stats(components, groups, samples),
    )


def log(
    run: run_setup.Run,
    trained: run_setup.Trained,
    epoch: int,
    scored: Scored,
    stats: dict[str, list],
    seconds: dict[str, float],
    global_step: int,
    threads: int,
    shown: tuple[tuple[str, str, str], ...] = (("kl-ref", "kl_to_reference", ".2e"),),
) -> dict:
    """The epoch's metrics (rewards, the training stats' means, timings) to every log; one line printed, with
    ``shown``: the algorithm's own stats to print, (label, metric, format) each, when logged."""
    rewards = scored.rewards
    metrics = {
        "epoch": epoch,
        "weights_spread_across_processes": run_setup.weights_spread(run.accelerator, trained.trainable),
        "global_step": global_step,
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()),
        **{
            f"reward_{name}_{stat}": float(getattr(r, stat)())
            for name, r in scored.components.items()
            for stat in ("mean", "std")
        },
        **scored.reward_stats,
        # Stats stay tensors until the epoch ends: reading one (.item()) waits for the GPU.
        **{k: float(torch.stack(v).float().mean()) for k, v in stats.items()},
        **tracking.by_category(scored.samples, rewards),
        "learning_rate": trained.optimizer.param_groups[0]["lr"],
        **{f"seconds_{name}": value for name, value in seconds.items()},
        "cpu_threads": threads,
    }
    run_setup.log_epoch(run, metrics, scored.components, scored.samples)
    run.accelerator.print(
        f"epoch {epoch:3d} | reward {metrics['reward_mean']:+.4f} ± {metrics['reward_std']:.4f} | "
        f"sample {seconds['sampling']:5.1f}s  reward-wait {seconds['reward_wait']:5.1f}s  "
        f"train {seconds['training']:5.1f}s | loss {metrics.get('loss', 0):+.2e} "
        + " ".join(f"{label} {metrics[key]:{spec}}" for label, key, spec in shown if key in metrics)
        + (f" | accuracy {metrics['accuracy']:.1%}" if "accuracy" in metrics else "")
    )
    return metrics


def online_train(body: Callable[[run_setup.Run, Any], list[dict]], doc: str) -> Callable[..., list[dict]]:
    """The ``train(cfg, reward_fn, prompt_fn, image_samples_hook)`` of an online algorithm (the arguments
    documented in trainer.algorithms.ddpo.loop.DOC), its docstring ``doc``: the run set up, then
    ``body(run, image_samples_hook)``."""

    def train(
        cfg: Config,
        reward_fn: RewardFn | dict[str, RewardFn] | None = None,
        prompt_fn: Callable[..., Any] | None = None,
        image_samples_hook: Callable[[int, list[dict]], None] | None = None,
    ) -> list[dict]:
        # One optimizer step spans the accumulated batches and, within each, every forward of trained timesteps.
        accumulation = cfg.train.gradient_accumulation_steps * len(BatchPlan.step_groups_of(cfg))
        with run_setup.started(cfg, accumulation, reward_fn, prompt_fn) as run:
            return body(run, image_samples_hook)

    train.__doc__ = doc
    return train


def forward_epochs(
    run: run_setup.Run,
    image_samples_hook,
    rollout_weights: Callable[[run_setup.Trained, int], ContextManager],
    updates: Callable[..., tuple[dict[str, list], int]],
    after_updates: Callable[[run_setup.Trained, int], None],
    shown: tuple[tuple[str, str, str], ...] = (("kl-ref", "kl_to_reference", ".2e"),),
) -> list[dict]:
    """The forward-process algorithms' epochs (DiffusionNFT, AWM, DGPO), with the lagging weights
    ``trained.old_policy``: (1) sample inside ``rollout_weights(trained, optimizer steps)``, keeping only the
    clean latents, while rewards are scored, (2) turn the rewards into advantages, (3) ``updates(run, trained,
    trajectories, advantages, epoch, optimizer steps)``, returning its stats and the steps after, then
    ``after_updates(trained, optimizer steps)``, (4) log (``shown``) and checkpoint; evaluations as due."""
    cfg = run.cfg
    online = start(run, lagging=True)
    trained, tracker, global_step = online.trained, online.tracker, online.global_step
    for epoch in range(run.start, cfg.run.num_epochs):
        if cfg.run.eval_every and epoch % cfg.run.eval_every == 0:
            evaluate_run(run, trained, epoch)
        threads = run.fit_threads()
        t0 = time.perf_counter()
        trained.model.eval()
        with rollout_weights(trained, global_step):
            collected = collect(run, online, epoch, cfg.sample.eta, store=False)
        scored = score(run, epoch, collected, tracker, image_samples_hook)
        t2 = time.perf_counter()
        stats, global_step = updates(run, trained, collected.trajectories, scored.advantages, epoch, global_step)
        after_updates(trained, global_step)
        t3 = time.perf_counter()
        seconds = {"sampling": collected.seconds, "reward_wait": scored.wait_seconds, "training": t3 - t2}
        stats["old_policy_decay"] = [torch.tensor(trained.old_policy.decay)]
        log(run, trained, epoch, scored, stats, {**seconds, "epoch": t3 - t0}, global_step, threads, shown)
        state = {"global_step": global_step, "tracker": tracker.state_dict() if tracker else None}
        run_setup.end_epoch(run, trained, epoch + 1, state)
    if cfg.run.eval_every:
        evaluate_run(run, trained, cfg.run.num_epochs)
    return run_setup.finish(run, trained)
