"""DGPO (Luo et al. 2025, "Reinforcing Diffusion Models by Direct Group Preference Optimization", arXiv
2510.08425; github.com/Luo-Yihong/DGPO): online RL on the forward process with a group-level preference.

On the online epoch's phases (trainer/epoch.py): per epoch (1) sample with the deterministic sampler (sample.eta
0) at guidance sample.guidance_scale, keeping the clean latents, from the EMA old weights once dgpo.switch_ema_ref
optimizer steps are done, (2) turn the rewards into group advantages, (3) train each group's samples at the same
dgpo.num_timesteps steps of the first dgpo.trunc of the schedule (one noise per group and step with
dgpo.use_shared_noise), without guidance, on DGPO's group-weighted denoising loss (loss.py), in batches of whole
groups; the EMA old model follows the weights after every optimizer step, (4) log and checkpoint (the EMA old
weights with the rest).
"""

from __future__ import annotations

import contextlib
import functools
from collections import defaultdict

import torch
from tqdm.auto import tqdm

from trainer import epoch as epoch_phases
from trainer import run as run_setup
from trainer.algorithms.dgpo.loss import clip_mask, denoising_error, dgpo_loss, kl_to_base
from trainer.config import Config
from trainer.families.models import weights_swapped
from trainer.loss import norm_hinge
from trainer.sampling import Trajectories, each_tensor


def _dgpo(run: run_setup.Run, image_samples_hook) -> list[dict]:
    """The forward-process epochs (trainer/epoch.py) with DGPO's rollout weights and updates; its EMA old model
    (``trained.old_policy``, DGPO's ema_ref) steps inside the updates, after every optimizer step."""
    shown = (("w", "group_weight", ".3f"), ("clipped", "clip_fraction", ".2f"), ("kl-ref", "kl_to_reference", ".2e"))
    rollout = functools.partial(rollout_weights, run.cfg)
    return epoch_phases.forward_epochs(run, image_samples_hook, rollout, _updates, lambda *_: None, shown)


train = epoch_phases.online_train(_dgpo, "Run DGPO; the arguments are DDPO's (trainer.algorithms.ddpo.loop.train).")


def rollout_weights(cfg: Config, trained: run_setup.Trained, global_step: int):
    """DGPO's switch_ema_ref: once that many optimizer steps are done, rollouts use the EMA old weights."""
    switch = cfg.dgpo.switch_ema_ref
    if switch and global_step >= switch:
        return weights_swapped(trained.trainable, trained.old_policy.shadow)
    return contextlib.nullcontext()


def group_draws(
    cfg: Config, epoch: int, inner: int, n: int, shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The steps (n, M) and noises (n, M, *shape) of n samples in groups of sample.images_per_prompt: each
    group's M steps drawn without replacement from the first dgpo.trunc of the schedule and shared by its
    samples; with dgpo.use_shared_noise one noise per group and step, else one per sample and step. From a
    generator seeded by run.seed, the epoch and the pass, so every process draws the same (DGPO draws on
    rank 0 and broadcasts) and a resumed run the same as an uninterrupted one. On the CPU."""
    g, d = cfg.sample.images_per_prompt, cfg.dgpo
    generator = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + epoch * 1_009 + inner)
    trunc = d.trunc_steps(cfg.sample.num_steps)
    steps = torch.stack([torch.randperm(trunc, generator=generator)[: d.num_timesteps] for _ in range(n // g)])
    count = n // g if d.use_shared_noise else n
    noise = torch.randn((count, d.num_timesteps, *shape), generator=generator)
    if d.use_shared_noise:
        noise = noise.repeat_interleave(g, dim=0)
    return steps.repeat_interleave(g, dim=0), noise


def _updates(run: run_setup.Run, trained: run_setup.Trained, batch: Trajectories, advantages, epoch: int, step: int):
    """train.num_inner_epochs passes over the epoch's clean latents in batches of train.batch_size samples,
    whole groups (the groups' order shuffled), each batch's M steps in the plan's denoiser forwards; the EMA
    old model steps after each optimizer step."""
    cfg, accelerator, plan = run.cfg, run.accelerator, run.plan
    run.interrupts.updating()
    trained.model.train()
    device, g = advantages.device, cfg.sample.images_per_prompt
    trained.family.dynamics.timesteps(cfg.sample.num_steps, device)  # the schedule the steps index
    clean, n, stats = batch.path[:, -1], len(advantages), defaultdict(list)
    negative = trained.family.encode_prompts([""]) if cfg.dgpo.kl_cfg != 1 else None  # the guided reference's
    for inner in range(cfg.train.num_inner_epochs):
        steps, noise = group_draws(cfg, epoch, inner, n, tuple(clean.shape[1:]))
        order = (torch.randperm(n // g)[:, None] * g + torch.arange(g)).reshape(-1).to(device)
        quiet = not accelerator.is_local_main_process
        for i in tqdm(range(0, n, cfg.train.batch_size), desc=f"epoch {epoch} training", disable=quiet, leave=False):
            rows = order[i : i + cfg.train.batch_size]
            cond = each_tensor(batch.prompt_embeds, lambda t: t[rows])
            for group in plan.step_groups:  # k steps per denoiser forward, a batch of k x train.batch_size
                with accelerator.accumulate(trained.model):
                    index, eps = steps[rows.cpu()][:, group].to(device), noise[rows.cpu()][:, group].to(device)
                    loss, step_stats = _loss(run, trained, clean[rows], cond, index, eps, advantages[rows], negative)
                    share = (group.stop - group.start) * len(plan.step_groups) / plan.train_timesteps
                    run_setup.backward_and_step(run, trained, loss * share, stats)
                stats["loss"].append(loss.detach())
                for k, v in step_stats.items():
                    stats[k].append(v)
                if accelerator.sync_gradients:  # DGPO's ema_ref steps with every optimizer step
                    trained.old_policy.decay = cfg.dgpo.old_decay(step)
                    trained.old_policy.update(trained.trainable)
                step += accelerator.sync_gradients
    return stats, step


def _loss(run: run_setup.Run, trained: run_setup.Trained, x0, cond, index, noise, advantages, negative=None):
    """DGPO's loss of B samples (whole groups) at their (B, k) steps with noises (B, k, ...): the trained
    denoiser's forward on the B x k noisy latents and, without gradient, the EMA old weights' (for the clip,
    or as the reference with dgpo.use_ema_ref) and the base's (the reference, and train.kl_coef's KL), guided
    by dgpo.kl_cfg against ``negative`` (the empty prompt's conditioning) when it is above 1."""
    cfg, family, accelerator, policy, d = run.cfg, trained.family, run.accelerator, trained.policy, run.cfg.dgpo
    b, k = index.shape
    x0 = x0.repeat_interleave(k, dim=0)
    cond = each_tensor(cond, lambda t: t.repeat_interleave(k, dim=0))
    x_t, t, target, _ = family.dynamics.noised_at(
        x0, noise.reshape(b * k, *x0.shape[1:]).to(x0.dtype), index.reshape(-1)
    )

    def predict(model, guidance: float = 1.0) -> torch.Tensor:  # DGPO trains the conditional prediction
        with accelerator.autocast():
            return family.predict(model, x_t, t, cond, negative if guidance != 1 else None, guidance).float()

    old = base = None  # the no-gradient forwards first: the trained one's saved tensors must not see swapped weights
    if d.clip or d.use_ema_ref:
        with torch.no_grad(), weights_swapped(trained.trainable, trained.old_policy.shadow):
            old = predict(policy)
    if not d.use_ema_ref or cfg.train.kl_coef or cfg.train.norm_guard_coef:
        with torch.no_grad(), trained.base() as reference:
            base = predict(reference, d.kl_cfg)
    prediction = predict(trained.model)

    def per_row(p: torch.Tensor) -> torch.Tensor:  # dsm per sample and step, (B, k)
        return denoising_error(p, target).reshape(b, k)

    dsm, old_dsm = per_row(prediction), per_row(old) if old is not None else None
    ref = old_dsm if d.use_ema_ref else per_row(base)
    loss, stats = dgpo_loss(
        dsm, ref, old_dsm if d.clip else None, advantages, cfg.sample.images_per_prompt,
        d.beta_dpo, d.clip, cfg.train.adv_clip_max,
    )  # fmt: skip
    if cfg.train.kl_coef:
        masked = clip_mask(dsm.detach(), old_dsm, advantages, d.clip) if d.kl_mask else None
        kl = kl_to_base(prediction, base, masked)
        loss, stats["kl_to_reference"] = loss + cfg.train.kl_coef * kl, kl.detach()
    if cfg.train.norm_guard_coef:
        hinge, hinge_stats = norm_hinge(prediction, base)
        loss, stats = loss + cfg.train.norm_guard_coef * hinge, stats | hinge_stats
    return loss, stats
