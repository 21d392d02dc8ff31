"""DDPO: the epoch loop that samples with log-probs while rewards are scored, then PPO-clip updates.

Reads top to bottom: set-up, then per epoch (1) sample batches and submit each to the reward function at
once, (2) wait for the epoch's rewards and turn them into advantages, (3) train on the stored trajectories.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from trainer import checkpoint, preflight, tracking
from trainer.advantages import PerPromptStatTracker, compute_advantages
from trainer.config import BatchPlan, Config
from trainer.ema import EMA
from trainer.interrupt import CtrlC
from trainer.loss import gaussian_kl, ppo_clip_loss
from trainer.models import load_family, make_trainable, save_weights
from trainer.prompts import make_prompt_fn, user_prompt_fn
from trainer.rewards import Pending, RewardFn, Rewards, reward_functions
from trainer.sampling import Trajectories, rescore, sample


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
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    out = Path(cfg.run.output_dir)
    accelerator = Accelerator(
        # Without a GPU, several processes must be told to use CPU (gloo); with one, accelerate picks it.
        cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
        mixed_precision=cfg.run.mixed_precision,
        # One optimizer step spans the accumulated batches and, within each, every trained timestep.
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps * BatchPlan.train_timesteps_of(cfg),
        log_with=None if cfg.run.log_with == "none" else cfg.run.log_with,
        project_dir=out,
    )
    # Every problem of the config, its models, files and reward servers at once, before any model loads.
    functions = reward_functions(reward_fn)
    plan = preflight.check(cfg, accelerator.num_processes, accelerator.device.type, skip=set(functions))
    accelerator.print(f"batch plan: {plan.describe()}")
    # The checkpoint is chosen (and verified) first: a damaged one fails before any model loads, and the
    # logs are trimmed to its epoch before anything is logged.
    resume, first_epoch = _resume_point(accelerator, cfg)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(cfg.model_dump_json(indent=2))  # the token is excluded from dumps
        if resume is not None:
            tracking.trim_logs(out, first_epoch)
        tracking.start_trackers(accelerator, cfg, first_epoch)
    if cfg.run.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    set_seed(cfg.run.seed, device_specific=True)
    prompt_rng = np.random.default_rng([cfg.run.seed, accelerator.process_index])
    prompt_fn = user_prompt_fn(prompt_fn) if prompt_fn is not None else make_prompt_fn(cfg.prompt.fn, cfg.prompt.path)
    reward_fns = None
    ctrl_c = CtrlC(out, accelerator.num_processes)
    # Whatever ends the run (an error, Ctrl-C), the reward clients' threads and event loops stop and the
    # trackers flush; the newest checkpoint stays the last complete one (checkpoint.save renames it into place).
    try:
        # Local scorers load here, on the training device: their errors come before the big models.
        reward_fns = Rewards(cfg.reward, device=str(accelerator.device), functions=functions)
        return _train(cfg, accelerator, plan, reward_fns, prompt_fn, prompt_rng, resume, first_epoch,
                      image_samples_hook, ctrl_c)
    except KeyboardInterrupt:
        ctrl_c.interrupted(accelerator.is_main_process)
        raise
    finally:
        ctrl_c.restore()
        try:
            if reward_fns is not None:
                reward_fns.close()
        finally:
            accelerator.end_training()


def _resume_point(accelerator, cfg: Config) -> tuple[Path | None, int]:
    """The verified checkpoint to resume from (None: a fresh run) and the epoch it ends."""
    from accelerate.utils import gather_object

    if cfg.run.resume_from is None:
        return None, 0

    def warn(message: str) -> None:
        if accelerator.is_main_process:
            print(message, file=sys.stderr, flush=True)

    found = checkpoint.resolve(cfg.run.resume_from, warn=warn)
    chosen = set(gather_object([found.name]))
    if len(chosen) > 1:  # e.g. a machine whose copy of the run folder differs; the processes would diverge
        raise checkpoint.CheckpointError(f"run.resume_from: the processes found different checkpoints: {sorted(chosen)}")
    return found, json.loads((found / "state.json").read_text())["epoch"]


def _train(cfg: Config, accelerator, plan: BatchPlan, reward_fns: Rewards, prompt_fn, prompt_rng,
           resume: Path | None, first_epoch: int, image_samples_hook, ctrl_c: CtrlC) -> list[dict]:
    from accelerate.utils import gather_object

    out = Path(cfg.run.output_dir)
    # One process builds the tiny model (save_pretrained writes weights only on rank 0 once torch.distributed
    # is up, so a build elsewhere would be empty); the others load it after.
    with accelerator.main_process_first():
        family = load_family(cfg, accelerator.device)
    accelerator.print(f"model: {family.pipe.name_or_path}")  # where the tiny model was built, or the checkpoint loaded
    trainable = make_trainable(family.denoiser, cfg)  # the same tensors the optimizer, EMA and checkpoints see
    if cfg.train.gradient_checkpointing:
        family.denoiser.enable_gradient_checkpointing()
    optimizer = _adamw(cfg)(
        trainable.values(),
        lr=cfg.train.learning_rate,
        betas=(cfg.train.adam_beta1, cfg.train.adam_beta2),
        weight_decay=cfg.train.adam_weight_decay,
        eps=cfg.train.adam_epsilon,
    )
    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler(  # stepped once per optimizer step, on every process alike
        cfg.train.lr_scheduler, optimizer, num_warmup_steps=cfg.train.lr_warmup_steps,
        num_training_steps=plan.optimizer_steps_per_epoch * cfg.run.num_epochs,
    )
    unet, optimizer = accelerator.prepare(family.denoiser, optimizer)
    negative_embeds = family.encode_prompts([""])
    resolution = cfg.sample.resolution or family.native_resolution()
    tracker = (
        PerPromptStatTracker(cfg.train.stat_buffer_size, cfg.train.stat_min_count)
        if cfg.train.per_prompt_stat_tracking
        else None
    )
    quiet = not accelerator.is_local_main_process  # one set of progress bars per machine
    # Training runs through the (possibly DDP-wrapped) ``unet``; sampling and the KL reference use the bare one.
    policy = accelerator.unwrap_model(unet)
    guidance = (negative_embeds if cfg.train.cfg else None, cfg.sample.guidance_scale, cfg.sample.eta)
    ema = EMA(trainable, cfg.train.ema_decay) if cfg.train.ema_decay else None
    history, global_step = [], 0
    if resume is not None:
        state = checkpoint.load(accelerator, resume, params=trainable, optimizer=optimizer, prompt_rng=prompt_rng, ema=ema)
        global_step = state["global_step"]
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        if tracker is not None and state.get("tracker"):
            tracker.load_state_dict(state["tracker"])
        accelerator.print(f"resumed from {resume} (epoch {first_epoch}, step {global_step})")

    def collect(epoch: int) -> Collected:
        """Sample one epoch's batches; each goes to the reward functions as reward.overlap says."""
        start = time.perf_counter()
        unet.eval()
        pending, batches, images = Pending(reward_fns), [], []
        for _ in tqdm(range(cfg.sample.num_batches_per_epoch), desc=f"epoch {epoch} sampling", disable=quiet, leave=False):
            k = cfg.sample.images_per_prompt
            drawn = [prompt_fn(prompt_rng) for _ in range(cfg.sample.batch_size // k)]
            prompts, metadata = zip(*(pair for pair in drawn for _ in range(k)))  # each prompt k times in a row
            with accelerator.autocast():
                batch, final = sample(
                    family, policy, list(prompts), list(metadata), negative_embeds,
                    cfg.sample.num_steps, cfg.sample.eta, cfg.sample.guidance_scale, resolution,
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
    for epoch in range(first_epoch, cfg.run.num_epochs):
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
            chunks = list(trajectories.shuffled(advantages_local, cfg.train.batch_size, plan.train_timesteps))
            # Decoupled PPO (Hilton et al. 2021, "Batch size-invariance for policy optimization"): samples
            # drawn from older weights (reward.overlap next_epoch) start with ratios outside a narrow clip
            # range and give no gradient; clip around the weights at the start of this update instead (one
            # extra forward per trained step), importance-weighted back to the weights that sampled.
            proximal = [_proximal(accelerator, policy, family, chunk, plan.train_timesteps, guidance)
                        if decoupled else None for chunk, _ in chunks]
            for (chunk, adv), prox in tqdm(zip(chunks, proximal), total=len(chunks), desc=f"epoch {epoch} training",
                                           disable=quiet, leave=False):
                for j in range(plan.train_timesteps):
                    with accelerator.accumulate(unet):
                        with accelerator.autocast():
                            log_prob, mean, sigma = rescore(family, unet, chunk, j, *guidance)
                        if prox is None:
                            loss, step_stats = ppo_clip_loss(
                                log_prob, chunk.log_probs[:, j], adv, cfg.train.clip_range, cfg.train.adv_clip_max
                            )
                        else:
                            weight = torch.exp(prox[:, j] - chunk.log_probs[:, j])  # proximal / behaviour
                            clipped = adv.clamp(-cfg.train.adv_clip_max, cfg.train.adv_clip_max)
                            # weight > 0 scales both PPO terms alike, so it can ride on the advantages
                            loss, step_stats = ppo_clip_loss(log_prob, prox[:, j], clipped * weight,
                                                             cfg.train.clip_range, float("inf"))
                            step_stats["stale_clipfrac"] = ((weight - 1).abs() > cfg.train.clip_range).float().mean()
                        if cfg.train.kl_coef:
                            kl = gaussian_kl(mean, _reference_mean(accelerator, policy, family, chunk, j, guidance), sigma)
                            loss = loss + cfg.train.kl_coef * kl.mean()
                            step_stats["kl_to_reference"] = kl.mean().detach()
                        accelerator.backward(loss)
                        if accelerator.sync_gradients:
                            grad_norm = accelerator.clip_grad_norm_(trainable.values(), cfg.train.max_grad_norm)
                            stats["grad_norm"].append(float(grad_norm))
                        optimizer.step()  # a no-op while accumulating
                        if accelerator.sync_gradients:
                            lr_scheduler.step()
                            if ema is not None:
                                ema.update(trainable)
                        optimizer.zero_grad()
                    stats["loss"].append(loss.item())
                    for k, v in step_stats.items():
                        stats[k].append(v.item())
                    if global_step == epoch_start_step:
                        # Before the epoch's first update the ratios measure only how stale the samples are:
                        # 0 when they come from the current weights, large with reward.overlap next_epoch.
                        stats["clipfrac_first_step"].append(step_stats["clipfrac"].item())
                    global_step += accelerator.sync_gradients
        t3 = time.perf_counter()

        # Every process must hold the same weights; a spread above 0 means gradients were not synchronised.
        checksum = torch.stack([p.detach().double().sum() for p in trainable.values()]).sum().reshape(1)
        sums = accelerator.gather(checksum.to(accelerator.device))
        metrics = {
            "epoch": epoch,
            "weights_spread_across_processes": float(sums.max() - sums.min()),
            "global_step": global_step,
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()),
            **{f"reward_{name}_{stat}": float(getattr(r, stat)()) for name, r in components.items() for stat in ("mean", "std")},
            **{k: float(np.mean(v)) for k, v in stats.items()},
            "learning_rate": optimizer.param_groups[0]["lr"],
            "seconds_sampling": sampling,
            "seconds_reward_wait": t2 - t1,
            "seconds_training": t3 - t2,
            "seconds_epoch": t3 - t0,
        }
        history.append(metrics)
        accelerator.log(metrics, step=epoch)
        board = tracking.tensorboard(accelerator)
        if board is not None:
            for name, r in components.items():
                board.add_histogram(f"reward/{name}", r, epoch)
        accelerator.print(
            f"epoch {epoch:3d} | reward {metrics['reward_mean']:+.4f} ± {metrics['reward_std']:.4f} | "
            f"sample {sampling:5.1f}s  reward-wait {t2 - t1:5.1f}s  train {t3 - t2:5.1f}s | "
            f"loss {metrics.get('loss', 0):+.2e} kl {metrics.get('approx_kl', 0):.2e} clipfrac {metrics.get('clipfrac', 0):.3f}"
        )
        if accelerator.is_main_process:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            with open(out / "samples.jsonl", "a") as f:  # every sample's prompt, reward and scorer info
                f.writelines(json.dumps(sample) + "\n" for sample in samples)
        done = epoch + 1
        save = functools.partial(  # bound now: what the epoch ended with, should Ctrl-C ask for it later
            checkpoint.save, accelerator, out, done, cfg.run.checkpoint_limit, params=trainable, optimizer=optimizer,
            state={"global_step": global_step, "lr_scheduler": lr_scheduler.state_dict(),
                   "tracker": tracker.state_dict() if tracker else None},
            prompt_rng=prompt_rng, ema=ema, rng=checkpoint.rng_state(prompt_rng),
        )
        due = done == cfg.run.num_epochs or (cfg.run.save_freq and done % cfg.run.save_freq == 0)
        if due:
            save()
        ctrl_c.epoch_done(None if due else save)

    accelerator.wait_for_everyone()
    if ema is not None:
        ema.copy_to(trainable)  # the published weights are the average
    if accelerator.is_main_process:
        where = save_weights(family, cfg, out)
        accelerator.print(f"saved weights to {where}")
        if cfg.run.push_to_hub:
            from huggingface_hub import HfApi

            api = HfApi()
            api.create_repo(cfg.run.push_to_hub, exist_ok=True)
            api.upload_folder(repo_id=cfg.run.push_to_hub, folder_path=where, commit_message=f"{cfg.preset}: {cfg.run.num_epochs} epochs")
            accelerator.print(f"uploaded {where} to {cfg.run.push_to_hub}")
    return history


@dataclass
class Collected:
    """One epoch's samples: stored trajectories, per-batch views and images, their reward futures."""

    trajectories: Trajectories
    batches: list[Trajectories]
    images: list[np.ndarray]
    pending: Pending
    seconds: float


def _adamw(cfg: Config):
    if cfg.train.use_8bit_adam:  # availability was checked with the config
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit
    return torch.optim.AdamW


@torch.no_grad()
def _proximal(accelerator, unet, family, chunk: Trajectories, steps: int, guidance) -> torch.Tensor:
    """(N, steps) log-probs of the chunk's stored steps under the current weights, as constants."""
    with accelerator.autocast():
        return torch.stack([rescore(family, unet, chunk, j, *guidance)[0] for j in range(steps)], dim=1)


@torch.no_grad()
def _reference_mean(accelerator, base, family, chunk, j, guidance) -> torch.Tensor:
    """The step's mean under the base model: the same (unwrapped) denoiser with its LoRA adapters switched off."""
    base.disable_adapters()
    try:
        with accelerator.autocast():
            return rescore(family, base, chunk, j, *guidance)[1]
    finally:
        base.enable_adapters()
