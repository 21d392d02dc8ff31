"""DDPO: the epoch loop that samples with log-probs while rewards are scored, then PPO-clip updates.

Reads top to bottom: the shared run set-up (trainer/run.py), then per epoch (1) sample batches and submit
each to the reward function at once, (2) wait for the epoch's rewards and turn them into advantages, (3)
train on the stored trajectories, (4) log and checkpoint.
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict

import torch
from tqdm.auto import tqdm

from trainer import epoch as epoch_phases
from trainer import run as run_setup
from trainer.evaluate import evaluate_run
from trainer.algorithms.ddpo.loss import ppo_clip_loss
from trainer.algorithms.ddpo.trained_steps import draw_window
from trainer.plan import BatchPlan
from trainer.sampling import Chunk, Trajectories, rescore


# What DDPO's epoch line prints besides the shared numbers: PPO's approximate KL and clipped share.
SHOWN = (("kl", "approx_kl", ".2e"), ("kl-ref", "kl_to_reference", ".2e"), ("clipfrac", "clipfrac", ".3f"))


def _ddpo(run: run_setup.Run, image_samples_hook) -> list[dict]:
    cfg = run.cfg
    online = epoch_phases.start(run)
    trained, tracker, global_step = online.trained, online.tracker, online.global_step
    guidance = (online.negative if cfg.ddpo.cfg else None, cfg.sample.guidance_scale, cfg.sample.eta)
    plan = run.plan  # re-planned at the run's first update with train.timesteps_per_forward 0 on a GPU

    window = functools.partial(draw_window, cfg.ddpo, run.prompt_rng)  # from the rng a checkpoint keeps

    def collect(epoch: int) -> epoch_phases.Collected:
        trained.model.eval()
        return epoch_phases.collect(run, online, epoch, cfg.sample.eta, window)

    upcoming = None
    for epoch in range(run.start, cfg.run.num_epochs):
        if cfg.run.eval_every and epoch % cfg.run.eval_every == 0:
            evaluate_run(run, trained, epoch)
        threads = run.fit_threads()  # fewer when other processes hold cores
        # 1. Sample, unless the previous epoch already did (reward.overlap = next_epoch).
        t0 = time.perf_counter()
        collected = upcoming or collect(epoch)
        sampling = 0.0 if upcoming else collected.seconds  # seconds spent sampling in this iteration
        upcoming = None
        if cfg.reward.overlap == "next_epoch" and epoch + 1 < cfg.run.num_epochs:
            # Sample epoch + 1 now, while this epoch's last rewards are scored: those samples come from
            # weights one update old, which the PPO ratio's stored behaviour log-probs account for.
            upcoming = collect(epoch + 1)
            sampling += upcoming.seconds
        # 2. Rewards of the whole epoch, gathered across processes, into advantages.
        scored = epoch_phases.score(run, epoch, collected, tracker, image_samples_hook)
        # 3. PPO-clip updates on the stored trajectories.
        t2 = time.perf_counter()
        stats, global_step, plan = _ppo_updates(
            run, trained, plan, collected.trajectories, scored.advantages, guidance, epoch, global_step
        )
        t3 = time.perf_counter()
        # 4. Log, checkpoint.
        seconds = {"sampling": sampling, "reward_wait": scored.wait_seconds, "training": t3 - t2, "epoch": t3 - t0}
        epoch_phases.log(run, trained, epoch, scored, stats, seconds, global_step, threads, SHOWN)
        run_setup.end_epoch(
            run, trained, epoch + 1, {"global_step": global_step, "tracker": tracker.state_dict() if tracker else None}
        )
    if cfg.run.eval_every:
        evaluate_run(run, trained, cfg.run.num_epochs)
    return run_setup.finish(run, trained)


# The shared train(cfg, reward_fn, prompt_fn, image_samples_hook) of the online algorithms (trainer/epoch.py).
DOC = """Run DDPO; returns the per-epoch metrics.

``reward_fn(images, prompts, metadata) -> (scores, info)``, as ddpo-pytorch's and TRL's: images uint8
numpy (N, H, W, 3) (a torch tensor in [0, 1], (N, 3, H, W), for a function marked ``torch_images``),
``info`` a dict of per-image lists or omitted; it may return a Future instead. A dict of name ->
function gives several, weighted and normalised like ``reward.components`` of the same names. They
replace ``reward.scorer``, or join ``reward.components``.

``prompt_fn(rng)`` or ``prompt_fn()`` returns a prompt or ``(prompt, metadata)`` (see trainer.prompts);
it replaces ``prompt.fn``.

``image_samples_hook(epoch, batches)``, as TRL's, receives this process's sampling batches of the epoch:
dicts with ``images`` (uint8 NHWC), ``prompts``, ``metadata``, ``rewards`` and ``info`` (each reward
component's per-image extras).
"""
train = epoch_phases.online_train(_ddpo, DOC)


def _ppo_updates(
    run: run_setup.Run,
    trained: run_setup.Trained,
    plan: BatchPlan,
    trajectories: Trajectories,
    advantages: torch.Tensor,
    guidance,
    epoch: int,
    global_step: int,
) -> tuple[dict[str, list], int, BatchPlan]:
    """train.num_inner_epochs passes of PPO-clip over the epoch's stored steps; the stats, step count and plan."""
    cfg, accelerator, family, unet, policy = run.cfg, run.accelerator, trained.family, trained.model, trained.policy
    run.interrupts.updating()
    unet.train()
    stats = defaultdict(list)
    decoupled = cfg.ddpo.decoupled_ppo == "on" or (
        cfg.ddpo.decoupled_ppo == "auto" and cfg.reward.overlap == "next_epoch"
    )
    epoch_start_step = global_step
    for inner in range(cfg.train.num_inner_epochs):
        t = cfg.train  # the picked steps are indices: no copies yet
        picks = trajectories.shuffled(
            t.batch_size, plan.train_timesteps, t.timestep_selection, t.timestep_span, t.timestep_shared
        )
        if epoch == run.start and inner == 0:  # the run's first update: timesteps_per_forward 0 measured (GPU)
            plan = _fitted_plan(run, trained, trajectories.chunk(*picks[0]), guidance)
        # Decoupled PPO (Hilton et al. 2021, "Batch size-invariance for policy optimization"): samples
        # drawn from older weights (reward.overlap next_epoch) start with ratios outside a narrow clip
        # range and give no gradient; clip around the weights at the start of this update instead (one
        # extra forward per trained step), importance-weighted back to the weights that sampled.
        proximal = [
            _proximal(accelerator, policy, family, trajectories.chunk(*pick), plan.step_groups, guidance)
            if decoupled
            else None
            for pick in picks
        ]
        for (rows, steps_of), prox in tqdm(
            zip(picks, proximal),
            total=len(picks),
            desc=f"epoch {epoch} training",
            disable=not accelerator.is_local_main_process,
            leave=False,
        ):
            chunk, adv = trajectories.chunk(rows, steps_of), advantages[rows]
            for steps in plan.step_groups:  # k timesteps per denoiser forward, a batch of k x train.batch_size
                with accelerator.accumulate(unet):
                    with accelerator.autocast():
                        log_prob, mean, sigma = rescore(family, unet, chunk, steps, *guidance)
                    behaviour, adv_k = chunk.log_probs[:, steps], adv[:, None].expand_as(log_prob)
                    if prox is None:
                        loss, step_stats = ppo_clip_loss(
                            log_prob, behaviour, adv_k, cfg.ddpo.clip_range, cfg.train.adv_clip_max
                        )
                    else:
                        weight = torch.exp(prox[:, steps] - behaviour)  # proximal / behaviour
                        clipped = adv_k.clamp(-cfg.train.adv_clip_max, cfg.train.adv_clip_max)
                        # weight > 0 scales both PPO terms alike, so it can ride on the advantages
                        loss, step_stats = ppo_clip_loss(
                            log_prob, prox[:, steps], clipped * weight, cfg.ddpo.clip_range, float("inf")
                        )
                        step_stats["stale_clipfrac"] = ((weight - 1).abs() > cfg.ddpo.clip_range).float().mean()
                    if cfg.train.kl_coef:
                        reference = _reference_mean(accelerator, trained, chunk, steps, guidance)
                        kl = family.dynamics.kl(mean, reference, sigma, chunk.steps[:, steps].reshape(-1))
                        loss = loss + cfg.train.kl_coef * kl.mean()
                        step_stats["kl_to_reference"] = kl.mean().detach()
                    # accelerate averages over the forwards it accumulates; weighting each by its share of
                    # the timesteps makes that the mean over samples and timesteps, for any grouping.
                    share = (steps.stop - steps.start) * len(plan.step_groups) / plan.train_timesteps
                    run_setup.backward_and_step(run, trained, loss * share, stats)
                stats["loss"].append(loss.detach())
                for k, v in step_stats.items():
                    stats[k].append(v)
                if global_step == epoch_start_step:
                    # Before the epoch's first update the ratios measure only how stale the samples are:
                    # 0 when they come from the current weights, large with reward.overlap next_epoch.
                    stats["clipfrac_first_step"].append(step_stats["clipfrac"])
                global_step += accelerator.sync_gradients
    return stats, global_step, plan


def _fitted_plan(run: run_setup.Run, trained: run_setup.Trained, chunk: Chunk, guidance) -> BatchPlan:
    """The plan to train with (run.fit_timesteps_per_forward), measured on DDPO's training forward of k
    timesteps of ``chunk``."""

    def forward(k: int) -> torch.Tensor:
        with run.accelerator.autocast():
            return rescore(trained.family, trained.model, chunk, slice(0, k), *guidance)[0]

    return run_setup.fit_timesteps_per_forward(run, trained, forward)


@torch.no_grad()
def _proximal(accelerator, unet, family, chunk: Chunk, step_groups, guidance) -> torch.Tensor:
    """(N, steps) log-probs of the chunk's stored steps under the current weights, as constants."""
    with accelerator.autocast():
        return torch.cat([rescore(family, unet, chunk, steps, *guidance)[0] for steps in step_groups], dim=1)


@torch.no_grad()
def _reference_mean(accelerator, trained, chunk, steps, guidance) -> torch.Tensor:
    """The steps' means under the base model (``trained.base()``: LoRA's adapters off, or the frozen copy)."""
    with trained.base() as base, accelerator.autocast():
        return rescore(trained.family, base, chunk, steps, *guidance)[1]
