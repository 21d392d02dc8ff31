"""Our DDPO vs TRL's DDPOTrainer (trl 0.23.1, the last release that has it) on the same work, interleaved.

    pip install trl==0.23.1 pandas   # not a dependency of ours
    python -m bench.vs_trl [--epochs 10] [--rounds 2]

Both train the embedded tiny pipeline with identical settings: 20 DDIM steps, eta 1, guidance 5, 32 samples
per epoch (4 batches of 8), train batch 8, LoRA r4 on attention, lr 3e-4, clip range 1e-4, every timestep
trained, compressibility, seed 42, fp32, one constant prompt (TRL calls its prompt function without an rng).
Runs alternate A B A B in one process; epochs 1.. are timed (epoch 0 is warm-up). Prints JSON: the median
ratio ours / TRL of epoch, sampling and training seconds (targets <= 0.6 and <= 0.5) and both reward curves
(epoch 0 samples the same images; after the first update they agree up to float rounding).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import numpy as np
import torch

PROMPT = "a photo of a cat"
SETTINGS = dict(steps=20, eta=1.0, guidance=5.0, sample_batch=8, batches=4, train_batch=8, lr=3e-4, clip=1e-4, seed=42)


def compressibility():
    from reward_servers.scorer import create_scorer

    scorer = create_scorer("compression")
    scorer.load("cpu")
    return scorer


def ours(epochs: int, cache_dir: str) -> dict:
    from trainer import Config, train

    s = SETTINGS
    with tempfile.TemporaryDirectory() as out:
        cfg = Config(
            run={"output_dir": out, "num_epochs": epochs, "seed": s["seed"], "log_with": "none", "log_images_every": 0,
                 "save_freq": 0},
            pretrained={"cache_dir": cache_dir},
            sample={"num_steps": s["steps"], "eta": s["eta"], "guidance_scale": s["guidance"],
                    "batch_size": s["sample_batch"], "num_batches_per_epoch": s["batches"]},
            train={"batch_size": s["train_batch"], "learning_rate": s["lr"], "clip_range": s["clip"], "timestep_fraction": 1.0,
                   "lora_rank": 4, "lora_alpha": 4.0, "lora_targets": ["to_q", "to_k", "to_v", "to_out.0"]},
            reward={"overlap": "none"},  # TRL scores after sampling
        )
        history = train(cfg, prompt_fn=lambda: PROMPT)
    return {"epoch": [m["seconds_epoch"] for m in history], "sampling": [m["seconds_sampling"] for m in history],
            "training": [m["seconds_training"] for m in history], "reward": [m["reward_mean"] for m in history]}


def trl(epochs: int, cache_dir: str) -> dict:
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    from trainer.tiny_pipeline import tiny_pipeline_path

    s, scorer, seconds = SETTINGS, compressibility(), {"sampling": [], "training": [], "epoch": [], "reward": []}

    def reward_fn(images, prompts, metadata):
        array = (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        scores = np.asarray(scorer.score(array, list(prompts), list(metadata)).scores, dtype=np.float32)
        seconds["reward"].append(float(scores.mean()))
        return torch.as_tensor(scores), {}

    with tempfile.TemporaryDirectory() as out:
        config = DDPOConfig(
            num_epochs=epochs, seed=s["seed"], log_with=None, logdir=out, save_freq=10**6, mixed_precision="no",
            sample_num_steps=s["steps"], sample_eta=s["eta"], sample_guidance_scale=s["guidance"],
            sample_batch_size=s["sample_batch"], sample_num_batches_per_epoch=s["batches"],
            train_batch_size=s["train_batch"], train_gradient_accumulation_steps=1, train_learning_rate=s["lr"],
            train_clip_range=s["clip"], train_timestep_fraction=1.0, per_prompt_stat_tracking=False,
        )
        pipeline = DefaultDDPOStableDiffusionPipeline(str(tiny_pipeline_path(cache_dir)), use_lora=True)
        trainer = DDPOTrainer(config, reward_fn, lambda: (PROMPT, {}), pipeline)

        def timed(name, fn):
            def wrapper(*args, **kwargs):
                start = time.perf_counter()
                result = fn(*args, **kwargs)
                seconds[name].append(time.perf_counter() - start)
                return result
            return wrapper

        trainer._generate_samples = timed("sampling", trainer._generate_samples)
        trainer._train_batched_samples = timed("training", trainer._train_batched_samples)
        global_step = 0
        for epoch in range(epochs):
            start = time.perf_counter()
            global_step = trainer.step(epoch, global_step)
            seconds["epoch"].append(time.perf_counter() - start)
    rewards = seconds.pop("reward")  # one mean per sampling batch: per epoch, their mean
    per_epoch = len(rewards) // epochs
    seconds["reward"] = [float(np.mean(rewards[i * per_epoch : (i + 1) * per_epoch])) for i in range(epochs)]
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()
    runs = {"ours": [], "trl": []}
    for _ in range(args.rounds):
        for name, fn in (("ours", ours), ("trl", trl)):
            runs[name].append(fn(args.epochs, args.cache_dir))
    med = {name: {k: statistics.median(v for r in rs for v in r[k][1:]) for k in ("epoch", "sampling", "training")}
           for name, rs in runs.items()}
    agree = abs(runs["ours"][0]["reward"][0] - runs["trl"][0]["reward"][0]) < 1e-5
    print(json.dumps({
        "benchmark": "vs_trl", "settings": SETTINGS, "epochs_timed": args.epochs - 1, "rounds": args.rounds,
        "median_seconds": {n: {k: round(v, 3) for k, v in m.items()} for n, m in med.items()},
        "ratio_ours_vs_trl": {k: round(med["ours"][k] / med["trl"][k], 3) for k in ("epoch", "sampling", "training")},
        "targets": {"epoch": "<= 0.6", "training": "<= 0.5"},
        "reward_curves": {n: [round(x, 4) for x in rs[0]["reward"]] for n, rs in runs.items()},
        # TRL averages float32 batch means, we average float64 scores: the same images, rounded apart
        "first_epoch_rewards_agree": agree,
    }))
    if not agree:
        raise SystemExit("bench.vs_trl: the first epoch's rewards differ: the two runs did not sample the same images")


if __name__ == "__main__":
    main()
