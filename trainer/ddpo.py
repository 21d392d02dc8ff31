"""DDPO: the epoch loop that samples with log-probs while rewards are scored, then PPO-clip updates.

Reads top to bottom: the shared run set-up (trainer/run.py), then per epoch (1) sample batches and submit
each to the reward function at once, (2) wait for the epoch's rewards and turn them into advantages, (3)
train on the stored trajectories, (4) log and checkpoint.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from trainer import run as run_setup
from trainer import tracking
from trainer.advantages import PerPromptStatTracker, compute_advantages
from trainer.config import Config
from trainer.evaluate import evaluate_run
from trainer.loss import ppo_clip_loss
from trainer.plan import BatchPlan
from trainer.rewards import Pending, RewardFn
from trainer.sampling import Chunk, Trajectories, rescore, sample


def train(
    cfg: Config,
    reward_fn: RewardFn | dict[str, RewardFn] | None = None,
    prompt_fn: Callable[..., Any] | None = None,
    image_samples_hook: Callable[[int, list[dict]], None] | None = None,
) -> list[dict]:
    """Run DDPO; returns the per-epoch metrics.

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
    # One optimizer step spans the accumulated batches and, within each, every forward of trained timesteps.
    accumulation = cfg.train.gradient_accumulation_steps * len(BatchPlan.step_groups_of(cfg))
    with run_setup.started(cfg, accumulation, reward_fn, prompt_fn) as run:
        return _ddpo(run, image_samples_hook)


def _ddpo(run: run_setup.Run, image_samples_hook) -> list[dict]:
    from accelerate.utils import gather_object

    cfg, accelerator, plan, out = run.cfg, run.accelerator, run.plan, run.out
    state = run_setup.load_model(run, plan.optimizer_steps_per_epoch * cfg.run.num_epochs)
    family, unet, optimizer = run.family, run.model, run.optimizer
    prompt_fn, prompt_rng, reward_fns, ctrl_c = run.prompt_fn, run.prompt_rng, run.rewards, run.ctrl_c
    negative_embeds = family.encode_prompts([""])
    resolution = cfg.sample.resolution or family.native_resolution()
    tracker = (
        PerPromptStatTracker(cfg.train.stat_buffer_size, cfg.train.stat_min_count)
        if cfg.train.per_prompt_stat_tracking
        else None
    )
    if tracker is not None and state.get("tracker"):
        tracker.load_state_dict(state["tracker"])
    global_step = state.get("global_step", 0)
    fitted = False  # train.timesteps_per_forward 0 on a GPU: measured on the first training batch
    quiet = not accelerator.is_local_main_process  # one set of progress bars per machine
    # Training runs through the (possibly DDP-wrapped) ``unet``; sampling and the KL reference use the bare one.
    policy = accelerator.unwrap_model(unet)
    guidance = (negative_embeds if cfg.train.cfg else None, cfg.sample.guidance_scale, cfg.sample.eta)

    def window() -> range | None:
        """The stochastic, trained steps of the next sampling batch (train.timestep_window)."""
        if not cfg.train.timestep_window:
            return None
        latest = cfg.train.timestep_window_latest_start
        start = int(prompt_rng.integers(latest + 1)) if latest else 0  # the rng a checkpoint keeps
        return range(start, start + cfg.train.timestep_window)

    def collect(epoch: int) -> Collected:
        """Sample one epoch's batches; each goes to the reward functions as reward.overlap says."""
        start = time.perf_counter()
        unet.eval()
        pending, batches, images = Pending(reward_fns), [], []
        size, k = cfg.sample.batch_size, cfg.sample.images_per_prompt
        drawn = [prompt_fn(prompt_rng) for _ in range(size * cfg.sample.num_batches_per_epoch // k)]
        epoch_prompts = [pair for pair in drawn for _ in range(k)]  # each prompt k times in a row: its group
        # Flow-GRPO's same_latent (flow_grpo issue 7): a group differs only by the sampler's noise.
        noise = (family.initial_latents(len(drawn), resolution, None, accelerator.device).repeat_interleave(k, dim=0)
                 if cfg.sample.same_noise_per_group else None)
        for b in tqdm(range(cfg.sample.num_batches_per_epoch), desc=f"epoch {epoch} sampling", disable=quiet, leave=False):
            prompts, metadata = zip(*epoch_prompts[b * size : (b + 1) * size])
            with accelerator.autocast():
                batch, final = sample(
                    family, policy, list(prompts), list(metadata), negative_embeds,
                    cfg.sample.num_steps, cfg.sample.eta, cfg.sample.guidance_scale, resolution, window=window(),
                    noise=None if noise is None else noise[b * size : (b + 1) * size],
                )
            images.append(family.to_uint8(final))
            batches.append(batch)
            if cfg.reward.overlap != "none":
                pending.add(reward_fns.submit(images[-1], batch.prompts, batch.metadata))
                pending.raise_if_failed()
        if cfg.reward.overlap == "none":  # TRL's order: score only once everything is sampled
            for array, batch in zip(images, batches):
                pending.add(reward_fns.submit(array, batch.prompts, batch.metadata))
        return Collected(Trajectories.cat(batches), batches, images, pending, time.perf_counter() - start)

    upcoming = None
    for epoch in range(run.first_epoch, cfg.run.num_epochs):
        if cfg.run.eval_every and epoch % cfg.run.eval_every == 0:
            evaluate_run(run, policy, epoch)
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
        trajectories, batches, images, pending = collected.trajectories, collected.batches, collected.images, collected.pending

        # 2. Rewards of the whole epoch, gathered across processes, into advantages.
        t1 = time.perf_counter()
        scored = pending.wait(cfg.reward.deadline)
        t2 = time.perf_counter()
        components = {
            name: accelerator.gather(torch.as_tensor(out.scores, device=accelerator.device)).cpu().numpy()
            for name, out in scored.items()
        }
        rewards = reward_fns.combine(components)
        prompts_all = gather_object(trajectories.prompts)
        samples = gather_object(tracking.sample_records(epoch, accelerator.process_index, trajectories.prompts, scored))
        for record, reward in zip(samples, rewards):  # gathered in the same (process-major) order
            record["reward"] = float(reward)
        # Groups: runs of images_per_prompt consecutive samples (same prompt, same process and batch).
        groups = np.arange(len(rewards)) // cfg.sample.images_per_prompt if cfg.sample.images_per_prompt > 1 else None
        advantages = compute_advantages(rewards, prompts_all, tracker, groups, cfg.train.group_std == "global")
        mine = advantages.reshape(accelerator.num_processes, -1)[accelerator.process_index]
        advantages_local = torch.as_tensor(mine, device=accelerator.device, dtype=torch.float32)

        last = epoch == cfg.run.num_epochs - 1  # the final epoch's grid is always kept
        sheet = bool(cfg.run.log_images_every) and (epoch % cfg.run.log_images_every == 0 or last)
        if image_samples_hook is not None or sheet:
            tracking.show_samples(accelerator, out, epoch, images, batches, scored, rewards, image_samples_hook, sheet)

        # 3. PPO-clip updates on the stored trajectories.
        ctrl_c.updating()
        unet.train()
        stats = defaultdict(list)
        decoupled = cfg.train.decoupled_ppo == "on" or (cfg.train.decoupled_ppo == "auto" and cfg.reward.overlap == "next_epoch")
        epoch_start_step = global_step
        for _ in range(cfg.train.num_inner_epochs):
            first = cfg.train.timestep_selection == "first"
            picks = trajectories.shuffled(cfg.train.batch_size, plan.train_timesteps, first)  # indices: no copies yet
            if not fitted:
                run.fit_timesteps_per_forward(trajectories.chunk(*picks[0]), guidance)
                plan, fitted = run.plan, True
            # Decoupled PPO (Hilton et al. 2021, "Batch size-invariance for policy optimization"): samples
            # drawn from older weights (reward.overlap next_epoch) start with ratios outside a narrow clip
            # range and give no gradient; clip around the weights at the start of this update instead (one
            # extra forward per trained step), importance-weighted back to the weights that sampled.
            proximal = [_proximal(accelerator, policy, family, trajectories.chunk(*pick), plan.step_groups, guidance)
                        if decoupled else None for pick in picks]
            for (rows, steps_of), prox in tqdm(zip(picks, proximal), total=len(picks), desc=f"epoch {epoch} training",
                                               disable=quiet, leave=False):
                chunk, adv = trajectories.chunk(rows, steps_of), advantages_local[rows]
                for steps in plan.step_groups:  # k timesteps per denoiser forward, a batch of k x train.batch_size
                    with accelerator.accumulate(unet):
                        with accelerator.autocast():
                            log_prob, mean, sigma = rescore(family, unet, chunk, steps, *guidance)
                        behaviour, adv_k = chunk.log_probs[:, steps], adv[:, None].expand_as(log_prob)
                        if prox is None:
                            loss, step_stats = ppo_clip_loss(
                                log_prob, behaviour, adv_k, cfg.train.clip_range, cfg.train.adv_clip_max
                            )
                        else:
                            weight = torch.exp(prox[:, steps] - behaviour)  # proximal / behaviour
                            clipped = adv_k.clamp(-cfg.train.adv_clip_max, cfg.train.adv_clip_max)
                            # weight > 0 scales both PPO terms alike, so it can ride on the advantages
                            loss, step_stats = ppo_clip_loss(log_prob, prox[:, steps], clipped * weight,
                                                             cfg.train.clip_range, float("inf"))
                            step_stats["stale_clipfrac"] = ((weight - 1).abs() > cfg.train.clip_range).float().mean()
                        if cfg.train.kl_coef:
                            reference = _reference_mean(accelerator, policy, family, chunk, steps, guidance)
                            kl = family.kl(mean, reference, sigma, chunk.steps[:, steps].reshape(-1))
                            loss = loss + cfg.train.kl_coef * kl.mean()
                            step_stats["kl_to_reference"] = kl.mean().detach()
                        # accelerate averages over the forwards it accumulates; weighting each by its share of
                        # the timesteps makes that the mean over samples and timesteps, for any grouping.
                        share = (steps.stop - steps.start) * len(plan.step_groups) / plan.train_timesteps
                        run_setup.backward_and_step(run, loss * share, stats)
                    # Stats stay tensors until the epoch ends: reading one (.item()) waits for the GPU.
                    stats["loss"].append(loss.detach())
                    for k, v in step_stats.items():
                        stats[k].append(v)
                    if global_step == epoch_start_step:
                        # Before the epoch's first update the ratios measure only how stale the samples are:
                        # 0 when they come from the current weights, large with reward.overlap next_epoch.
                        stats["clipfrac_first_step"].append(step_stats["clipfrac"])
                    global_step += accelerator.sync_gradients
        t3 = time.perf_counter()

        # 4. Log, checkpoint.
        metrics = {
            "epoch": epoch,
            "weights_spread_across_processes": run_setup.weights_spread(run),
            "global_step": global_step,
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()),
            **{f"reward_{name}_{stat}": float(getattr(r, stat)()) for name, r in components.items() for stat in ("mean", "std")},
            **{k: float(torch.stack(v).float().mean()) for k, v in stats.items()},
            **tracking.by_category(samples, rewards),
            "learning_rate": optimizer.param_groups[0]["lr"],
            "seconds_sampling": sampling,
            "seconds_reward_wait": t2 - t1,
            "seconds_training": t3 - t2,
            "seconds_epoch": t3 - t0,
            "cpu_threads": threads,
        }
        run_setup.log_epoch(run, metrics, components, samples)
        accelerator.print(
            f"epoch {epoch:3d} | reward {metrics['reward_mean']:+.4f} ± {metrics['reward_std']:.4f} | "
            f"sample {sampling:5.1f}s  reward-wait {t2 - t1:5.1f}s  train {t3 - t2:5.1f}s | "
            f"loss {metrics.get('loss', 0):+.2e} kl {metrics.get('approx_kl', 0):.2e} clipfrac {metrics.get('clipfrac', 0):.3f}"
            + (f" | accuracy {metrics['accuracy']:.1%}" if "accuracy" in metrics else "")
        )
        run_setup.end_epoch(run, epoch + 1, {"global_step": global_step, "tracker": tracker.state_dict() if tracker else None})
    if cfg.run.eval_every:
        evaluate_run(run, policy, cfg.run.num_epochs)
    return run_setup.finish(run)


@dataclass
class Collected:
    """One epoch's samples: stored trajectories, per-batch views and images, their reward futures."""

    trajectories: Trajectories
    batches: list[Trajectories]
    images: list[np.ndarray]
    pending: Pending
    seconds: float


@torch.no_grad()
def _proximal(accelerator, unet, family, chunk: Chunk, step_groups, guidance) -> torch.Tensor:
    """(N, steps) log-probs of the chunk's stored steps under the current weights, as constants."""
    with accelerator.autocast():
        return torch.cat([rescore(family, unet, chunk, steps, *guidance)[0] for steps in step_groups], dim=1)


@torch.no_grad()
def _reference_mean(accelerator, base, family, chunk, steps, guidance) -> torch.Tensor:
    """The steps' means under the base model: the same (unwrapped) denoiser with its LoRA adapters switched off."""
    base.disable_adapters()
    try:
        with accelerator.autocast():
            return rescore(family, base, chunk, steps, *guidance)[1]
    finally:
        base.enable_adapters()
