"""ReFL, DRaFT and AlignProp: the gradient of a differentiable reward, through the VAE decoder and the last
denoising step(s), trains the denoiser directly.

- ReFL (Xu et al. 2023, "ImageReward: Learning and Evaluating Human Preferences for Text-to-Image
  Generation"): the prompt encoded without guidance, ``refl.num_steps`` (40) deterministic steps; a step
  ``mid`` drawn from [30, 39]; the steps before it without gradient, one denoiser call with gradient at
  ``mid``, its predicted x0 decoded and scored; loss ``relu(margin - r).mean() * grad_scale`` (2, 1e-3).
- DRaFT-K (Clark et al. 2024, "Directly Fine-Tuning Diffusion Models on Differentiable Rewards"): the whole
  sampler, the gradient through its last K steps; loss ``-r.mean() * grad_scale``.
- AlignProp (Prabhudesai et al. 2023, "Aligning Text-to-Image Diffusion Models with Reward
  Backpropagation"): the gradient through the last k steps, k drawn from 1..num_steps per batch
  (randomised truncation), each step checkpointed so memory does not grow with k.

With ``refl.pretrain_data``, every ``refl.pretrain_every`` reward steps are followed by an optimizer step of
the plain denoising loss on real images with their captions (ReFL's regularisation by pre-training data,
which keeps the model from drifting into the reward's blind spots).

The reward is ``reward.scorer`` in process (a scorer with ``score_tensor``: the same model code as its
scoring path) or a reward server's ``/v1/score_grad`` (``reward.url``), whose gradient with respect to the
pixels an autograd function injects (trainer/rewards.py: ``remote_scores``), so the trainer's GPU never
holds the reward model. Reads top to bottom: the shared run set-up, then per optimizer step over its
accumulated batches (1) prompts, (2) the truncated rollout, (3) decode, reward and loss, (4) the pre-training
step, (5) log, evaluate, checkpoint. Steps count optimizer steps, as DPO's.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch
import torch.utils.checkpoint

from trainer import run as run_setup
from trainer.config import Config
from trainer.loss import denoising_errors
from trainer.datacheck import images_source
from trainer.pairs import PairBatches, Pairs, load_images, loader, next_batch
from trainer.rewards import RemoteReward, remote_scores
from trainer.sharding import agreed
from trainer.step_loop import Stats, step_loop


def train(cfg: Config) -> list[dict]:
    """Run ReFL / DRaFT / AlignProp (``refl.mode``); returns the logged per-step metrics."""
    with run_setup.started(cfg, cfg.train.gradient_accumulation_steps) as run:
        return _refl(run)


def _refl(run: run_setup.Run) -> list[dict]:
    cfg, accelerator, r = run.cfg, run.accelerator, run.cfg.refl
    accumulation = cfg.train.gradient_accumulation_steps
    real = load_images(r.pretrain_data) if r.pretrain_data else None  # before the model: a bad source fails first
    pretrain_steps = r.max_train_steps // r.pretrain_every if real is not None else 0
    trained = run_setup.load_model(run, r.max_train_steps + pretrain_steps)
    family, model = trained.family, trained.model
    reward = differentiable_reward(run)
    resolution = cfg.sample.resolution or family.native_resolution()
    negative = family.encode_prompts([""]) if r.guidance_scale > 1 else None
    if real is not None:
        root = Path(r.pretrain_data) if Path(r.pretrain_data).is_dir() else None
        check = images_source(r.pretrain_data, allow_outside=r.pretrain_allow_outside_paths).check  # preflight read it
        images = Pairs(real, resolution, seed=cfg.run.seed, root=root, winners_only=True, check=check)
        batches = PairBatches(
            len(images),
            cfg.train.batch_size,
            accelerator.num_processes,
            accelerator.process_index,
            cfg.run.seed,
            skip=(run.start // r.pretrain_every) * accumulation,
        )  # where a resumed run was
        real = iter(loader(images, batches, 0))

    def one_step(step: int) -> Stats:
        stats = defaultdict(list)
        for _ in range(accumulation):
            prompts = [run.prompt_fn(run.prompt_rng)[0] for _ in range(cfg.train.batch_size)]
            with accelerator.accumulate(model):
                x0, calls = rollout(run, trained, prompts, resolution, negative)
                rewards = reward(family.vae.decode(x0), prompts)
                objective = torch.relu(r.margin - rewards) if r.mode == "refl" else -rewards
                loss = objective.mean() * r.grad_scale
                run_setup.backward_and_step(run, trained, loss, stats)
            stats["loss"].append(loss.detach())
            stats["reward_mean"].append(rewards.detach().float().mean())
            stats["denoiser_calls_with_grad"].append(torch.tensor(float(calls)))
        if real is not None and (step + 1) % r.pretrain_every == 0:
            pretrain_stats = defaultdict(list)
            for _ in range(accumulation):
                with accelerator.accumulate(model):
                    error, _ = denoising_errors(accelerator, family, model, next_batch(real), resolution)
                    run_setup.backward_and_step(run, trained, error.mean() * r.pretrain_weight, pretrain_stats)
                stats["pretrain_loss"].append(error.mean().detach())
            stats["pretrain_grad_norm"] += pretrain_stats["grad_norm"]
        return stats

    return step_loop(run, trained, r, one_step, {"reward": "reward_mean"}, r.mode)


def differentiable_reward(run) -> Callable[[torch.Tensor, list[str]], torch.Tensor]:
    """``reward(images (N, 3, H, W) in [0, 1], prompts) -> (N,)`` with a gradient to the images; videos
    (N, 3, F, H, W) score each frame as an image and take the mean per video (the pooling of trainer/rewards.py's
    in-process video scores)."""
    (source,) = run.rewards.sources.values()  # the config allows one reward for refl
    if isinstance(source, RemoteReward):
        return per_frame(lambda images, prompts: remote_scores(source.client, images, prompts))
    return per_frame(lambda images, prompts: source.scorer.score_tensor(images, prompts).to(images.device))


def per_frame(score: Callable[[torch.Tensor, list[str]], torch.Tensor]) -> Callable:
    """``score`` of images as it is; of videos, the mean of their frames' scores."""

    def scored(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if images.ndim == 4:
            return score(images, prompts)
        n, frames = images.shape[0], images.shape[2]
        each = score(images.movedim(2, 1).flatten(0, 1), [p for p in prompts for _ in range(frames)])
        return each.view(n, frames).mean(dim=1)

    return scored


def rollout(run, trained, prompts: list[str], resolution: int, negative) -> tuple[torch.Tensor, int]:
    """Deterministic sampling from noise, with gradient only where the mode says: the predicted x0 at the
    last step taken (ReFL: ``mid``; DRaFT, AlignProp: the final one) and the number of denoiser calls with
    gradient. The steps with gradient run ``trained.model``, those without the bare denoiser
    ``trained.policy`` (no DDP bookkeeping)."""
    family, model, policy, r = trained.family, trained.model, trained.policy, run.cfg.refl
    device = run.accelerator.device
    timesteps = family.dynamics.timesteps(r.num_steps, device)
    cond = family.encode_prompts(prompts, resolution)
    x = family.initial_latents(len(prompts), resolution, None, device)
    if r.mode == "refl":
        last = agreed(int(run.prompt_rng.integers(r.mid_low, r.mid_high + 1)), trained.trainable)
        first_with_grad = last
    else:
        last = r.num_steps - 1
        k = (
            r.draft_k
            if r.mode == "draft"
            else agreed(int(run.prompt_rng.integers(1, r.num_steps + 1)), trained.trainable)
        )
        first_with_grad = r.num_steps - k

    def denoise(x: torch.Tensor, i: int, net) -> torch.Tensor:
        with run.accelerator.autocast():
            return family.predict(net, x, timesteps[i], cond, negative, r.guidance_scale)

    for i in range(first_with_grad):
        with torch.no_grad():
            x = family.dynamics.step(denoise(x, i, policy), i, x, 0.0)[0]
    for i in range(first_with_grad, last + 1):
        if r.mode == "alignprop":  # recomputed in backward: memory of one step, whatever k
            output = torch.utils.checkpoint.checkpoint(denoise, x, i, model, use_reentrant=False)
        else:
            output = denoise(x, i, model)
        if i == last:
            return family.dynamics.predicted_x0(output, i, x), last + 1 - first_with_grad
        x = family.dynamics.step(output, i, x, 0.0)[0]
    raise AssertionError("unreachable")
