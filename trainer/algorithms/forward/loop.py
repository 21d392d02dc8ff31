"""Online RL on the forward process: DiffusionNFT (Zheng et al. 2025, "DiffusionNFT: Online Diffusion
Reinforcement with Forward Process"; github.com/NVlabs/DiffusionNFT) and Advantage Weighted Matching (Xue et
al. 2025; github.com/scxue/advantage_weighted_matching).

Reads top to bottom like DDPO (trainer/algorithms/ddpo/loop.py), on the same epoch phases (trainer/epoch.py):
per epoch (1) sample with any sampler, keeping only each image's clean latents, while rewards are scored, (2) turn the
rewards into advantages, (3) train the denoising loss on the clean latents re-noised at the sampler's own
steps: NFT mixes the prediction with a lagging old policy's (loss.py here, nft_loss), AWM weights it by the
advantage with KL terms to the base and to the lagging average (awm_loss), (4) move the lagging weights
toward the current ones, log and checkpoint. No log-prob, no stored trajectory.
"""

from __future__ import annotations

import contextlib
import functools
from collections import defaultdict

import torch
from tqdm.auto import tqdm

from trainer import epoch as epoch_phases
from trainer import run as run_setup
from trainer.families.models import weights_swapped
from trainer.algorithms.forward.loss import awm_loss, nft_loss, nft_optimality
from trainer.loss import norm_hinge
from trainer.sampling import Trajectories, each_tensor, pick_steps, shared_steps


def _forward(run: run_setup.Run, image_samples_hook) -> list[dict]:
    cfg = run.cfg

    def lagging(trained: run_setup.Trained, global_step: int) -> None:
        """The lagging weights follow the current ones once per epoch (DiffusionNFT's soft update)."""
        trained.old_policy.decay = (cfg.nft if cfg.algorithm == "nft" else cfg.awm).old_decay(global_step)
        trained.old_policy.update(trained.trainable)

    rollout = functools.partial(_rollout_weights, run)
    return epoch_phases.forward_epochs(run, image_samples_hook, rollout, _updates, lagging)


train = epoch_phases.online_train(
    _forward,
    "Run DiffusionNFT or AWM (``cfg.algorithm``); the arguments are DDPO's (trainer.algorithms.ddpo.loop.train).",
)


def _rollout_weights(run: run_setup.Run, trained: run_setup.Trained, global_step: int):
    """DiffusionNFT samples with its old policy (NVlabs/DiffusionNFT train_nft_sd3.py switches to the "old"
    adapter before sampling); AWM, and NFT with nft.rollout_policy current, with the trained weights."""
    if run.cfg.algorithm == "nft" and run.cfg.nft.rollout_policy == "old":
        return weights_swapped(trained.trainable, trained.old_policy.shadow)
    return contextlib.nullcontext()


def _updates(
    run: run_setup.Run,
    trained: run_setup.Trained,
    batch: Trajectories,
    advantages: torch.Tensor,
    epoch: int,
    global_step: int,
) -> tuple[dict[str, list], int]:
    """train.num_inner_epochs passes over the epoch's clean latents, each sample at its own
    train.timestep_fraction of the sampler's steps (train.timestep_selection; fresh noise each), in
    micro-batches of train.batch_size."""
    cfg, accelerator, plan = run.cfg, run.accelerator, run.plan
    run.interrupts.updating()
    trained.model.train()
    device = advantages.device
    trained.family.dynamics.timesteps(
        cfg.sample.num_steps, device
    )  # the schedule the steps index (evaluation may use another)
    clean, n, stats = batch.path[:, -1], len(advantages), defaultdict(list)
    for _ in range(cfg.train.num_inner_epochs):
        order = torch.randperm(n, device=device)
        t = cfg.train
        steps = pick_steps(n, cfg.sample.num_steps, plan.train_timesteps, t.timestep_selection, device, t.timestep_span)
        for i in tqdm(
            range(0, n, cfg.train.batch_size),
            desc=f"epoch {epoch} training",
            disable=not accelerator.is_local_main_process,
            leave=False,
        ):
            rows = order[i : i + cfg.train.batch_size]
            cond = each_tensor(batch.prompt_embeds, lambda t: t[rows])
            for group in plan.step_groups:  # k steps per denoiser forward, a batch of k x train.batch_size
                with accelerator.accumulate(trained.model):
                    index = shared_steps(steps[rows], t.timestep_shared)[:, group]
                    loss, step_stats = _loss(run, trained, clean[rows], cond, index, advantages[rows])
                    share = (group.stop - group.start) * len(plan.step_groups) / plan.train_timesteps
                    run_setup.backward_and_step(run, trained, loss * share, stats)
                stats["loss"].append(loss.detach())
                for k, v in step_stats.items():
                    stats[k].append(v)
                global_step += accelerator.sync_gradients
    return stats, global_step


def _loss(
    run: run_setup.Run,
    trained: run_setup.Trained,
    x0: torch.Tensor,
    cond,
    index: torch.Tensor,
    advantages: torch.Tensor,
):
    """The loss of B samples at their (B, k) schedule steps: one forward of the trained denoiser on B x k noisy
    latents and, without gradient, the lagging weights' (swapped in) and, with train.kl_coef, the base's."""
    cfg, family, accelerator, policy = run.cfg, trained.family, run.accelerator, trained.policy
    k = index.shape[1]
    x0, index, advantages = x0.repeat_interleave(k, dim=0), index.reshape(-1), advantages.repeat_interleave(k)
    cond = each_tensor(cond, lambda t: t.repeat_interleave(k, dim=0))
    x_t, t, target, time = family.dynamics.noised_at(x0, torch.randn_like(x0), index)

    def predict(model) -> torch.Tensor:  # the conditional prediction: both methods train without guidance
        with accelerator.autocast():
            return family.predict(model, x_t, t, cond, None, 1.0).float()

    lagging = None  # first: the trained forward's saved tensors must not see the swapped weights
    if cfg.algorithm == "nft" or cfg.awm.ema_kl_coef:
        with torch.no_grad(), weights_swapped(trained.trainable, trained.old_policy.shadow):
            lagging = predict(policy)
    prediction = predict(trained.model)
    if cfg.algorithm == "nft":
        loss, stats = nft_loss(
            prediction,
            lagging,
            x0,
            lambda p: family.dynamics.predicted_x0(p, index, x_t),
            nft_optimality(advantages, cfg.train.adv_clip_max),
            cfg.nft.beta,
            cfg.train.adv_clip_max,
        )
    else:
        loss, stats = awm_loss(prediction, target.float(), time, advantages, cfg.train.adv_clip_max, cfg.awm.power)
        if lagging is not None:
            ema_kl = ((prediction - lagging) ** 2).mean()
            loss, stats["kl_to_average"] = loss + cfg.awm.ema_kl_coef * ema_kl, ema_kl.detach()
    if cfg.train.kl_coef or cfg.train.norm_guard_coef:
        with torch.no_grad(), trained.base() as base:
            reference = predict(base)
    if cfg.train.kl_coef:
        kl = ((prediction - reference) ** 2).mean()
        loss = loss + cfg.train.kl_coef * kl
        stats["kl_to_reference"] = kl.detach()
    if cfg.train.norm_guard_coef:
        hinge, hinge_stats = norm_hinge(prediction, reference)
        loss, stats = loss + cfg.train.norm_guard_coef * hinge, stats | hinge_stats
    return loss, stats
