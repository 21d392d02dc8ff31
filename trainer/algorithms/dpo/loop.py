"""Diffusion-DPO: preference finetuning on pairs of images of one caption, the winner first.

Wallace et al. 2023, "Diffusion Model Alignment Using Direct Preference Optimization"
(github.com/SalesforceAIResearch/DiffusionDPO). Both images of a pair are noised with the same noise at the
same timestep; the loss (loss.py beside this file) rewards the model for denoising the winner better, and the loser
worse, than the reference does. For flow-matching models (SD3) it is the same formula on the velocity
target (the family's ``noised``). ``dpo.sft`` trains the plain denoising loss on the winners instead.

Reads top to bottom: the shared run set-up (trainer/run.py), the pairs (trainer/pairs.py), then per optimizer
step over its accumulated batches (1) a batch of pairs into latents, relabelled by the reward when asked,
(2) winner and loser noised alike, (3) the policy's and the reference's errors into the loss, (4) log,
evaluate, checkpoint. Steps count optimizer steps; checkpoints are ``checkpoint-<steps done>``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer import run as run_setup
from trainer.config import Config
from trainer.evaluate import evaluate
from trainer.families.models import adapters_disabled, weights_swapped
from trainer.algorithms.dpo.loss import diffusion_dpo_loss
from trainer.loss import denoising_errors
from trainer.datacheck import RowError, pairs_source
from trainer.pairs import PairBatches, Pairs, PairsError, load_pairs, loader, next_batch
from trainer.rewards import Pending, RewardFn, best_and_worst, pair_scores
from trainer.step_loop import Stats, step_loop


def train(cfg: Config, reward_fn: RewardFn | dict[str, RewardFn] | None = None) -> list[dict]:
    """Run Diffusion-DPO (or SFT); returns the logged per-step metrics. ``reward_fn``: as DDPO's, used to
    evaluate (run.eval_every) and, with dpo.relabel, to choose each pair's winner."""
    with run_setup.started(cfg, cfg.train.gradient_accumulation_steps, reward_fn) as run:
        return _dpo(run)


def _dpo(run: run_setup.Run) -> list[dict]:
    cfg, accelerator, d = run.cfg, run.accelerator, run.cfg.dpo
    accumulation = cfg.train.gradient_accumulation_steps
    effective_batch = cfg.train.batch_size * accumulation * accelerator.num_processes
    learning_rate = cfg.train.learning_rate * (effective_batch if d.scale_lr else 1)
    pairs = None if d.online else load_pairs(d.dataset, d.split, d.cache_dir)  # before the model: fails first
    base = not d.sft and d.reference == "base"  # a full finetune keeps the base's frozen copy for it
    trained = run_setup.load_model(run, d.max_train_steps, learning_rate, reference=base)
    model = trained.model
    resolution = cfg.sample.resolution or trained.family.native_resolution()
    rounds: list[dict] = []  # online: each round's sampled rewards, logged with the next step
    if d.online:
        data = _online_pairs(run, trained, resolution, rounds)
        accelerator.print(
            f"online Diffusion-DPO: rounds of {d.online_pairs} pairs (the best and the worst of "
            f"{d.online_images_per_prompt} images per prompt), {d.online_epochs} pass(es) each, "
            f"effective batch {effective_batch}, learning rate {learning_rate:g}"
        )
    else:
        accelerator.print(
            f"Diffusion-DPO{' (SFT)' if d.sft else ''}: {len(pairs)} pairs, effective batch "
            f"{effective_batch}, learning rate {learning_rate:g}"
        )
        root = Path(d.dataset) if Path(d.dataset).is_dir() else None
        dataset = Pairs(
            pairs,
            resolution,
            seed=cfg.run.seed,
            random_crop=d.random_crop,
            hflip=d.hflip,
            proportion_empty_prompts=d.proportion_empty_prompts,
            root=root,
            winners_only=d.sft and not d.relabel,
            check=_row_check(cfg),
        )
        batches = PairBatches(
            len(dataset),
            cfg.train.batch_size,
            accelerator.num_processes,
            accelerator.process_index,
            cfg.run.seed,
            skip=run.start * accumulation,
        )
        data = iter(loader(dataset, batches, d.dataloader_num_workers))
    reference = None if d.sft else _reference(trained, trained.ema if d.reference == "ema" else None)

    def one_step(step: int) -> Stats:
        model.train()
        stats, waited, start = defaultdict(list), 0.0, time.perf_counter()
        for _ in range(accumulation):
            t = time.perf_counter()
            batch = next_batch(data)  # a bad row past dpo.check_rows stops the run here, before it is trained on
            waited += time.perf_counter() - t
            weights = _relabel(run, batch) if d.relabel else batch.get("weights")
            with accelerator.accumulate(model):
                loss, step_stats = _pair_loss(run, trained, reference, batch, resolution, weights)
                run_setup.backward_and_step(run, trained, loss, stats)
            stats["loss"].append(loss.detach())
            for k, v in step_stats.items():
                stats[k].append(v)
        stats["seconds_data_wait"].append(torch.tensor(waited))
        stats["data_wait_share"].append(torch.tensor(waited / (time.perf_counter() - start)))
        return stats

    return step_loop(
        run,
        trained,
        d,
        one_step,
        {"loss": "loss", "acc": "implicit_accuracy"},
        "dpo",
        lambda: rounds.pop() if rounds else {},
    )


def _online_pairs(run, trained, resolution: int, rounds: list[dict]):
    """Batches of pairs from rounds sampled by the current policy: per round, ``dpo.online_pairs`` prompts of
    prompt.fn, ``dpo.online_images_per_prompt`` images each (deterministic DDIM from seeds of the prompt
    stream), scored by the reward as each sampling batch finishes (the overlap DDPO has); each prompt's best-
    and worst-scored image make its pair, the higher-scored first, ties weighted 0; ``dpo.online_epochs``
    passes over a round's pairs (reshuffled after the first) before the next is sampled, since sampling costs
    far more than a step. The reference stays the base model. A resumed run starts a fresh round from its
    checkpointed streams."""
    cfg, policy = run.cfg, trained.policy
    n, k, size = cfg.dpo.online_pairs, cfg.dpo.online_images_per_prompt, cfg.train.batch_size
    while True:
        drawn = [run.prompt_fn(run.prompt_rng) for _ in range(n)]
        seeds = run.prompt_rng.integers(2**31, size=k * n).tolist()
        prompts = [p for p, _ in drawn for _ in range(k)]
        with torch.no_grad():
            images, scored = evaluate(
                trained.family,
                policy,
                prompts,
                [m for _, m in drawn for _ in range(k)],
                run.rewards,
                num_steps=cfg.sample.num_steps,
                guidance_scale=cfg.sample.guidance_scale,
                resolution=resolution,
                seeds=seeds,
                batch_size=cfg.sample.batch_size,
                deadline=cfg.reward.deadline,
                autocast=run.accelerator.autocast,
            )
        policy.train()
        groups = pair_scores(run.rewards, scored, k)
        chosen = best_and_worst(groups)
        scores = np.take_along_axis(groups, chosen, axis=1)
        rounds[:] = [
            {"online_reward_mean": float(groups.mean()), "online_ties": float((scores[:, 0] == scores[:, 1]).mean())}
        ]
        pixels = torch.from_numpy(images.reshape(n, k, *images.shape[1:])[np.arange(n)[:, None], chosen])
        pixels = pixels.movedim(-1, 2).float().div(255)  # (n, 2, 3, H, W), videos (n, 2, 3, F, H, W)
        pixels, weights = _winner_first(pixels, scores, run.accelerator.device)
        for epoch in range(cfg.dpo.online_epochs):
            order = np.arange(n) if epoch == 0 else run.prompt_rng.permutation(n)
            for start in range(0, n - size + 1, size):
                part = order[start : start + size]
                captions = [drawn[i][0] for i in part]
                yield {
                    "pixels": pixels[part],
                    "captions": captions,
                    "prompts": captions,
                    "weights": weights[part],
                    "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * size),
                }


def _row_check(cfg: Config):
    """How each pair is checked as it is read (the rows past dpo.check_rows were not checked up front)."""
    d = cfg.dpo
    try:
        return pairs_source(d.dataset, split=d.split, cache_dir=d.cache_dir, allow_outside=d.allow_outside_paths).check
    except RowError as exc:
        raise PairsError(f"dpo.dataset: {exc}") from None


def _reference(trained: run_setup.Trained, ema=None):
    """The reference's prediction, without gradient: with LoRA the same denoiser with its adapters switched
    off (no second copy in memory), else the base's frozen copy made before the first update (sharded like the
    policy under run.sharding). With ``ema`` (the run's moving average of the weights, restored already when
    resuming), the policy itself with the average's weights swapped in (trainer.families.models.weights_swapped:
    no copy unsharded, copied into the shards sharded), before the policy's own forward."""

    @torch.no_grad()
    def predict(family, latents, timesteps, cond):
        if ema is not None:
            with weights_swapped(trained.trainable, ema.shadow):
                return family.predict(trained.policy, latents, timesteps, cond, None, 1.0)
        if trained.frozen is None:
            with adapters_disabled(trained.policy):
                return family.predict(trained.policy, latents, timesteps, cond, None, 1.0)
        return family.predict(trained.frozen, latents, timesteps, cond, None, 1.0)

    return predict


def _pair_loss(run, trained, reference, batch: dict[str, Any], resolution: int, weights: torch.Tensor | None):
    """The batch's loss and detached stats. Pairs are (winner, loser) rows of ``batch["pixels"]``."""
    cfg, accelerator, family, model = run.cfg, run.accelerator, trained.family, trained.model
    if cfg.dpo.sft:
        winners = {**batch, "pixels": batch["pixels"][:, :1]}
        error, _ = denoising_errors(accelerator, family, model, winners, resolution)
        return error.mean(), {"model_mse_winner": error.mean().detach()}
    error, reference_error = denoising_errors(accelerator, family, model, batch, resolution, reference)
    return diffusion_dpo_loss(
        error[0::2], error[1::2], reference_error[0::2], reference_error[1::2], cfg.dpo.beta, weights=weights
    )


def _relabel(run, batch: dict[str, Any]) -> torch.Tensor:
    """Score both images of every pair with the run's reward and put the higher first (in place); returns
    each pair's weight: 0 for a tie, which teaches nothing (Diffusion-DPO's --choice_model, AI feedback)."""
    pixels = batch["pixels"]
    images = (pixels.flatten(0, 1) * 255).round().to(torch.uint8).movedim(1, -1).numpy()  # NHWC (videos NFHWC)
    prompts = [p for p in batch["prompts"] for _ in range(2)]
    pending = Pending(run.rewards)
    pending.add(run.rewards.submit(images, prompts, [{} for _ in prompts]))
    batch["pixels"], weights = _winner_first(
        pixels, pair_scores(run.rewards, pending.wait(run.cfg.reward.deadline)), run.accelerator.device
    )
    return weights


def _winner_first(pixels: torch.Tensor, scores, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs (n, 2, ...) with the higher-scored image first, and each pair's weight: 0 for a tie, which
    teaches nothing."""
    swap = torch.as_tensor(scores[:, 1] > scores[:, 0])
    pixels = torch.where(swap.view(-1, *[1] * (pixels.ndim - 1)), pixels.flip(1), pixels)
    return pixels, torch.as_tensor(scores[:, 0] != scores[:, 1], dtype=torch.float32, device=device)
