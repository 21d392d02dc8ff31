"""Our DDPO vs TRL's DDPOTrainer (trl 0.23.1, the last release that has it) on the same work, each in its own
process from its own entry point, interleaved A B A B; and our DiffusionNFT epoch on the same images.

    pip install trl==0.23.1 pandas   # not a dependency of ours
    python -m bench.vs_trl [--epochs 10] [--rounds 2]

Both train the embedded tiny pipeline with identical settings: 20 DDIM steps, eta 1, guidance 5, 32 samples
per epoch (4 batches of 8), train batch 8, LoRA r4 on attention, lr 3e-4, clip range 1e-4, every timestep
trained, compressibility, seed 42, fp32, one constant prompt (TRL calls its prompt function without an rng).
Ours runs as a user runs it, ``python -m trainer`` with its defaults (rewards scored while the next batch
samples) and its seconds read from metrics.jsonl; TRL's ``DDPOTrainer.train`` runs in a child of this
script, its sampling and training phases timed. ``nft`` is ``python -m trainer --algorithm nft`` on the same
images (deterministic sampling, no stored trajectory, 4 of the 20 steps trained per image). Epochs 1.. are
timed (epoch 0 is warm-up). Prints JSON: the median seconds per epoch of each and the ratios to TRL; the
floor of our epoch is its sampling (the epoch cannot be faster), given as ``epoch_floor_ratio``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROMPT = "a photo of a cat"
SETTINGS = dict(steps=20, eta=1.0, guidance=5.0, sample_batch=8, batches=4, train_batch=8, lr=3e-4, clip=1e-4, seed=42)
PARTS = ("epoch", "sampling", "training")


def ours_command(epochs: int, out: Path, prompts: Path, *extra: str) -> list[str]:
    s = SETTINGS
    return [
        sys.executable,
        "-m",
        "trainer",
        "--preset",
        "tiny",
        "--run.output_dir",
        str(out),
        "--run.num_epochs",
        str(epochs),
        "--run.seed",
        str(s["seed"]),
        "--run.log_with",
        "none",
        "--run.log_images_every",
        "0",
        "--run.save_freq",
        "0",
        "--sample.num_steps",
        str(s["steps"]),
        "--sample.eta",
        str(s["eta"]),
        "--sample.guidance_scale",
        str(s["guidance"]),
        "--sample.batch_size",
        str(s["sample_batch"]),
        "--sample.num_batches_per_epoch",
        str(s["batches"]),
        "--train.batch_size",
        str(s["train_batch"]),
        "--train.learning_rate",
        str(s["lr"]),
        "--ddpo.clip_range",
        str(s["clip"]),
        "--train.timestep_fraction",
        "1.0",
        "--train.lora_rank",
        "4",
        "--train.lora_alpha",
        "4",
        "--train.lora_targets",
        '["to_q","to_k","to_v","to_out.0"]',
        "--prompt.fn",
        "from_file",
        "--prompt.path",
        str(prompts),
        "--reward.scorer",
        "compression",
        *extra,
    ]


def run_ours(epochs: int, tmp: Path, *extra: str) -> dict:
    out = tmp / f"ours-{time.monotonic_ns()}"
    prompts = tmp / "prompt.txt"
    prompts.write_text(PROMPT + "\n")
    subprocess.run(ours_command(epochs, out, prompts, *extra), check=True, capture_output=True, text=True)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        **{part: [m[f"seconds_{part}"] for m in metrics] for part in PARTS},
        "reward": [m["reward_mean"] for m in metrics],
        "threads": [m["cpu_threads"] for m in metrics],
    }


def run_trl(epochs: int) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "bench.vs_trl", "--trl-child", "--epochs", str(epochs)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def trl_child(epochs: int) -> None:
    """TRL's DDPOTrainer on the same settings, as its own script would run it; prints the per-epoch seconds."""
    import torch
    from accelerate import PartialState
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    PartialState()  # TRL's pipeline logs through accelerate before its trainer makes an Accelerator

    from scorers.scorer import create_scorer
    from trainer.families.tiny_pipeline import tiny_pipeline_path

    s, scorer = SETTINGS, create_scorer("compression")
    scorer.load("cpu")
    seconds = {"sampling": [], "training": [], "epoch": [], "reward": []}

    def reward_fn(images, prompts, metadata):
        array = (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        scores = np.asarray(scorer.score(array, list(prompts), list(metadata)).scores, dtype=np.float32)
        seconds["reward"].append(float(scores.mean()))
        return torch.as_tensor(scores), {}

    with tempfile.TemporaryDirectory() as out:
        config = DDPOConfig(
            num_epochs=epochs,
            seed=s["seed"],
            log_with=None,
            logdir=out,
            save_freq=10**6,
            mixed_precision="no",
            sample_num_steps=s["steps"],
            sample_eta=s["eta"],
            sample_guidance_scale=s["guidance"],
            sample_batch_size=s["sample_batch"],
            sample_num_batches_per_epoch=s["batches"],
            train_batch_size=s["train_batch"],
            train_gradient_accumulation_steps=1,
            train_learning_rate=s["lr"],
            train_clip_range=s["clip"],
            train_timestep_fraction=1.0,
            per_prompt_stat_tracking=False,
        )
        pipeline = DefaultDDPOStableDiffusionPipeline(str(tiny_pipeline_path()), use_lora=True)
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
        trainer.step = timed("epoch", trainer.step)
        trainer.train()
    rewards = seconds.pop("reward")  # one mean per sampling batch: per epoch, their mean
    per_epoch = len(rewards) // epochs
    seconds["reward"] = [float(np.mean(rewards[i * per_epoch : (i + 1) * per_epoch])) for i in range(epochs)]
    seconds["threads"] = [__import__("torch").get_num_threads()] * epochs
    print(json.dumps(seconds))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--trl-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_child:
        return trl_child(args.epochs)
    runs = {"ours": [], "trl": [], "nft": []}
    nft = ("--algorithm", "nft", "--sample.eta", "0", "--train.timestep_fraction", "0.2")
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):  # A B C A B C: the machine's drift hits every system alike
            runs["ours"].append(run_ours(args.epochs, Path(tmp)))
            runs["trl"].append(run_trl(args.epochs))
            runs["nft"].append(run_ours(args.epochs, Path(tmp), *nft))
    med = {name: {k: statistics.median(v for r in rs for v in r[k][1:]) for k in PARTS} for name, rs in runs.items()}
    print(
        json.dumps(
            {
                "benchmark": "vs_trl",
                "settings": SETTINGS,
                "epochs_timed": args.epochs - 1,
                "rounds": args.rounds,
                "cpu_count": os.cpu_count(),
                "threads": {n: sorted({t for r in rs for t in r["threads"]}) for n, rs in runs.items()},
                "median_seconds": {n: {k: round(v, 3) for k, v in m.items()} for n, m in med.items()},
                "ratio_ours_vs_trl": {k: round(med["ours"][k] / med["trl"][k], 3) for k in PARTS},
                "epoch_floor_ratio": round(med["ours"]["sampling"] / med["trl"]["epoch"], 3),
                "ratio_nft_vs_ours_ddpo": {k: round(med["nft"][k] / med["ours"][k], 3) for k in PARTS},
                "reward_curves": {n: [round(x, 4) for x in rs[0]["reward"]] for n, rs in runs.items()},
                # the same images in epoch 0 (the same seeds; TRL averages float32 batch means)
                "first_epoch_rewards_agree": abs(runs["ours"][0]["reward"][0] - runs["trl"][0]["reward"][0]) < 1e-4,
            }
        )
    )


if __name__ == "__main__":
    main()
