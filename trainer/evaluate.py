"""Evaluation: a fixed prompt set, fixed seeds, deterministic sampling, rewards as JSON and an image grid.

Every image starts from its own seed (``seed`` + its index), so the numbers do not depend on the batch size
or the number of processes (beyond float rounding), and a base model and its LoRA are compared on the same
noise. Sampling is deterministic (DDIM eta 0 / the flow ODE) at the evaluation step count: it measures the
model, not the policy's exploration noise. The trainer runs the same function every ``run.eval_every`` epochs on
``prompt.eval_path`` (as Flow-GRPO does) and logs it to eval.jsonl and its trackers; ``python -m
trainer.evaluate`` runs it on saved weights (its command line is trainer/tools/evaluate.py).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from trainer import tracking
from trainer.drift import Drift
from trainer.drift import summary as drift_summary
from trainer.sharding import any_sharded


def evaluate(
    family,
    model,
    prompts: list[str],
    metadata: list[dict[str, Any]],
    rewards,
    *,
    num_steps: int,
    guidance_scale: float,
    resolution: int,
    seeds: list[int],
    batch_size: int,
    deadline: float = 600.0,
    autocast=contextlib.nullcontext,
    probe=None,
) -> tuple[np.ndarray, dict]:
    """uint8 NHWC images (videos: (N, F, H, W, 3)) and the scorers' outputs ({component: ScoreOutput}) of
    ``prompts``, image i from noise seeded by ``seeds[i]``. ``probe(latents, cond, seeds)``, when given, sees each
    batch's final latents (trainer.drift.Drift)."""
    import torch

    from trainer.rewards import Pending

    device = model.device
    model.eval()  # the trainer evaluates between updates, which leave the model in training mode
    negative = family.encode_prompts([""])
    restore = getattr(
        family.pipe.scheduler, "num_inference_steps", None
    )  # training re-scores with the sampling schedule
    pending, images = Pending(rewards), []
    try:
        timesteps = family.dynamics.timesteps(num_steps, device)
        for start in range(0, len(prompts), batch_size):
            part = slice(start, start + batch_size)
            x = torch.cat(
                [
                    family.initial_latents(1, resolution, torch.Generator(device).manual_seed(s), device)
                    for s in seeds[part]
                ]
            )
            cond = family.encode_prompts(prompts[part], resolution)
            # sampling.sample without what training needs: no trajectory kept, no log-probs (eta 0 is the ODE)
            with torch.no_grad(), autocast():
                for i, t in enumerate(timesteps):
                    x = family.dynamics.step(family.predict(model, x, t, cond, negative, guidance_scale), i, x, 0.0)[0]
            if probe is not None:
                probe(x, cond, seeds[part])
            images.append(family.vae.to_uint8(x))
            pending.add(rewards.submit(images[-1], prompts[part], metadata[part]))
    finally:
        if restore:
            family.dynamics.timesteps(restore, device)
    return np.concatenate(images), pending.wait(deadline)


def summary(prompts: list[str], scored: dict, total: np.ndarray) -> dict:
    """Mean rewards, and per prompt (each of its images) in first-seen order."""
    out = {
        "reward_mean": float(total.mean()),
        "reward_std": float(total.std()),
        **{f"reward_{name}_mean": float(s.scores.mean()) for name, s in scored.items()},
        **tracking.by_category(tracking.sample_records(0, 0, prompts, scored), total),
    }
    order = list(dict.fromkeys(prompts))
    index = np.array([order.index(p) for p in prompts])
    out["per_prompt"] = [
        {
            "prompt": p,
            "reward": float(total[index == k].mean()),
            "rewards": total[index == k].round(6).tolist(),
            **{f"reward_{name}": s.scores[index == k].round(6).tolist() for name, s in scored.items()},
        }
        for k, p in enumerate(order)
    ]
    return out


def save_grid(images: np.ndarray, prompts: list[str], total: np.ndarray, path: Path, columns: int) -> None:
    """The captioned grid at ``path``; videos: frame strips there and the animation beside it (.gif)."""
    from trainer.grid import save_sheet

    path.parent.mkdir(parents=True, exist_ok=True)
    save_sheet(list(images), [f"{r:+.3f} {p}" for p, r in zip(prompts, total)], columns, path)


def save_before_after(first: tuple, last: tuple, prompts: list[str], path: Path, count: int = 24) -> None:
    """The first image of each of the first ``count`` distinct prompts at two evaluations, side by side:
    the same seeds, so a cell pair differs only by training. ``first``/``last``: (epochs, images, rewards); videos
    as ``save_grid``'s."""
    from trainer.grid import save_sheet

    firsts = [prompts.index(p) for p in list(dict.fromkeys(prompts))[:count]]
    cells, captions = [], []
    for i in firsts:
        for epochs, images, rewards in (first, last):
            cells.append(images[i])
            captions.append(f"epoch {epochs}: {rewards[i]:+.2f} {prompts[i]}")
    save_sheet(cells, captions, 8, path)


def eval_prompts(cfg, prompt_fn) -> tuple[list[str], list[dict[str, Any]]]:
    """``prompt.eval_path`` (one prompt per line), else ``prompt.eval_count`` draws of the prompt function from
    an rng of their own (the training prompts' rng, which checkpoints keep, is not touched)."""
    if cfg.prompt.eval_path is not None:
        from trainer.prompts import lines

        prompts = list(lines(cfg.prompt.eval_path, "prompt.eval_path"))
        return prompts, [{} for _ in prompts]
    rng = np.random.default_rng([cfg.run.eval_seed, 1 << 20])
    prompts, metadata = zip(*(prompt_fn(rng) for _ in range(cfg.prompt.eval_count)))
    return list(prompts), list(metadata)


def _gathered(mine: list[int], images: np.ndarray, scored: dict, drift: dict[str, list[float]]):
    """Every process's evaluated prompts (``mine``: their indices, this process's) gathered in prompt order:
    the rows (index, image, scores), the scorers' outputs and the drift values of all of them."""
    from accelerate.utils import gather_object

    from trainer.rewards import ScoreOutput

    rows = gather_object(
        [
            (
                i,
                images[k],
                {n: (float(s.scores[k]), {key: v[k] for key, v in s.info.items()}) for n, s in scored.items()},
                {n: v[k] for n, v in drift.items()},
            )
            for k, i in enumerate(mine)
        ]
    )
    rows.sort(key=lambda row: row[0])
    scored = {
        n: ScoreOutput(
            np.array([row[2][n][0] for row in rows]),
            {key: [row[2][n][1][key] for row in rows] for key in scored[n].info},
        )
        for n in scored
    }
    return rows, scored, {n: np.array([row[3][n] for row in rows]) for n in drift}


def evaluate_run(run, trained, after_epochs: int, unit: str = "epochs", final: bool | None = None) -> dict:
    """The trainer's periodic evaluation of the weights (``trained.policy``, the bare denoiser a
    ``trainer.run.Trained`` holds) after ``after_epochs`` epochs (or optimizer steps: ``unit``; the record's
    "epoch"), the before/after grid at the ``final`` one (default: after run.num_epochs): each process takes
    every n-th prompt; the main process writes eval.jsonl and eval/after-NNNN.png and logs ``eval/*``. What
    one evaluation leaves the next (the eval scorer, the first evaluation) is ``run.evaluations``."""
    cfg, accelerator = run.cfg, run.accelerator
    prompts, metadata = eval_prompts(cfg, run.prompt_fn)
    mine = list(range(accelerator.process_index, len(prompts), accelerator.num_processes))
    kept = len(mine)
    if any_sharded(trained.trainable):
        # A sharded denoiser gathers its weights in each forward, with every process: all run as many
        # batches, a short share topped up with prompt 0, whose results are dropped.
        mine += [0] * (-(-len(prompts) // accelerator.num_processes) - kept)
    rewards = run.rewards
    if cfg.run.eval_scorer:  # loaded at the first evaluation, kept for the others
        rewards = run.evaluations.rewards(cfg.run.eval_scorer, accelerator.device)
    drift = None
    if cfg.run.eval_drift and (cfg.train.lora or trained.frozen is not None):  # a base model to compare with
        drift = Drift(trained.family, trained.policy, trained.base, accelerator.autocast)
    images, scored = evaluate(
        trained.family,
        trained.policy,
        [prompts[i] for i in mine],
        [metadata[i] for i in mine],
        rewards,
        num_steps=cfg.sample.eval_num_steps or cfg.sample.num_steps,
        guidance_scale=cfg.sample.guidance_scale,
        resolution=cfg.sample.resolution or trained.family.native_resolution(),
        seeds=[cfg.run.eval_seed + i for i in mine],
        batch_size=cfg.sample.batch_size,
        deadline=cfg.reward.deadline,
        autocast=accelerator.autocast,
        probe=drift,
    )
    rows, scored, drifted = _gathered(mine[:kept], images, scored, drift.values if drift else {})
    total = rewards.combine({n: s.scores for n, s in scored.items()})
    shown_prompts = [prompts[row[0]] for row in rows]
    result = {"epoch": after_epochs, **summary(shown_prompts, scored, total)}
    if drift:
        result |= drift_summary(drifted, tracking.categories(tracking.sample_records(0, 0, shown_prompts, scored)))
    accelerator.log({f"eval/{k}": v for k, v in result.items() if k != "per_prompt"}, step=after_epochs)
    if accelerator.is_main_process:
        with open(run.out / "eval.jsonl", "a") as f:
            f.write(json.dumps(result) + "\n")
        shown = np.stack([row[1] for row in rows])
        save_grid(shown, prompts, total, run.out / "eval" / f"after-{after_epochs:04d}.png", columns=min(8, len(rows)))
        evaluations = run.evaluations
        if evaluations.first is None:  # this process's first evaluation: before training, unless resumed
            evaluations.first = (after_epochs, shown, total)
        elif (after_epochs == cfg.run.num_epochs) if final is None else final:
            save_before_after(
                evaluations.first, (after_epochs, shown, total), prompts, run.out / "eval" / "before_after.png"
            )
    accuracy = f" | accuracy {result['accuracy']:.1%}" if "accuracy" in result else ""
    accelerator.print(
        f"eval after {after_epochs} {unit} | reward {result['reward_mean']:+.4f}{accuracy} on {len(prompts)} prompts"
    )
    return result


if __name__ == "__main__":  # python -m trainer.evaluate: the command line, trainer/tools/evaluate.py
    # Imported by name: trainer.tools.evaluate imports this module, and what runs here is __main__, not it.
    import importlib

    importlib.import_module("trainer.tools.evaluate").main()
