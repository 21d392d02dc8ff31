"""How much of a DDPO gradient is signal? The policy gradient of a recipe at the base weights, measured.

    python -m bench.gradient_snr                                        # the default run (preset shapes)
    python -m bench.gradient_snr --steps 24 --variants "--train.timestep_fraction 1.0;--sample.eta 0.5"

A learning curve costs a 15-minute run and an evaluation whose noise is 2-3 points; this costs a minute or
two per recipe. The trainer runs its own epochs (sampling, rewards, advantages, PPO loss) but takes no
optimizer step: the weights stay the base model's, so every optimizer step's accumulated gradient g_i (over
the effective train batch) is an independent estimate of the same policy gradient mu. With K of them, the
noise of one estimate is T = sum_i |g_i - mean|^2 / (K - 1) and |mu|^2 = |mean|^2 - T / K (unbiased).
Reported: the signal-to-noise ratio of one optimizer step's gradient (|mu|^2 / T), overall and per adapted
layer kind; the samples one step would need for a ratio of 1 (the effective batch / the ratio) and the same
in CPU seconds of sampling and training; the cosine between the means of two halves of the estimates (near
0: the halves disagree). The ratio's own error shrinks with K and with the number of directions the noise
spreads over: on tiny-shapes about +-0.015 at K = 16 (pure noise's halves cosine reaches 0.25 there: the
noise lies in few directions), so it tells a mostly-signal recipe from a mostly-noise one, not two noisy
ones apart. Adam moves each weight by about the learning rate whatever the ratio, so at a ratio far below 1
its steps are a random walk, which degrades a pretrained model.

Each variant (``;``-separated sets of overrides, on top of the common ones) runs in the same process after
the baseline (no variant overrides), and is reported with ratios against it.
"""

from __future__ import annotations

import json
import shlex
import sys
import tempfile
import time

import numpy as np
import torch

from bench.learning import bench_config
from trainer import run as run_setup
from trainer.algorithms.ddpo.loop import train


def snr(gradients: np.ndarray) -> dict:
    """Signal-to-noise of K independent estimates (rows) of one gradient."""
    k = len(gradients)
    mean = gradients.mean(axis=0)
    noise = float(((gradients - mean) ** 2).sum(axis=1).sum() / (k - 1))  # E|g_i - mu|^2
    signal = float(mean @ mean - noise / k)
    halves = gradients[: k // 2].mean(axis=0), gradients[k // 2 :].mean(axis=0)
    cosine = float(halves[0] @ halves[1] / (np.linalg.norm(halves[0]) * np.linalg.norm(halves[1]) + 1e-30))
    return {
        "estimates": k,
        "signal_to_noise_per_step": signal / noise,
        "halves_cosine": cosine,
        "gradient_norm": float(np.sqrt((gradients**2).sum(axis=1)).mean()),
    }


def _kind(name: str) -> str:
    """The layer kind of a trainable weight: "...attentions.0.proj_in.lora_A.weight" -> "proj_in" (with full
    finetuning, "...resnets.0.conv1.weight" -> "conv1")."""
    parts = name.split(".")
    lora = [i for i, part in enumerate(parts) if part.startswith("lora_")]
    end = lora[0] if lora else len(parts) - 1
    return ".".join(parts[end - 2 : end]) if parts[end - 1].isdigit() else parts[end - 1]  # "to_out.0"


def measure(args: list[str], steps: int) -> dict:
    """Run the recipe without optimizer steps until ``steps`` gradients are collected."""
    gradients: list[np.ndarray] = []
    kinds: list[str] = []  # per weight: the adapted layer's kind (to_q, conv1, ...), or the parameter's name

    def backward_only(run, trained, loss, stats):
        run.accelerator.backward(loss)
        if run.accelerator.sync_gradients:
            if not kinds:
                for name, p in trained.trainable.items():
                    kinds.extend([_kind(name)] * p.numel())
            gradients.append(
                torch.cat(
                    [
                        (p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                        for p in trained.trainable.values()
                    ]
                )
                .double()
                .cpu()
                .numpy()
            )
            trained.optimizer.zero_grad()

    with tempfile.TemporaryDirectory() as tmp:
        cfg = bench_config(["--run.eval_every", "0", "--run.log_images_every", "0", *args], tmp)
        per_epoch = cfg.sample.batch_size * cfg.sample.num_batches_per_epoch
        effective = cfg.train.batch_size * cfg.train.gradient_accumulation_steps
        cfg.run.num_epochs = -(-steps // max(per_epoch // effective, 1))
        original, run_setup.backward_and_step = run_setup.backward_and_step, backward_only
        start = time.perf_counter()
        try:
            history = train(cfg)
        finally:
            run_setup.backward_and_step = original
        wall = time.perf_counter() - start
    stacked, kinds_array = np.stack(gradients), np.array(kinds)
    result = snr(stacked)
    result["per_layer_kind"] = {
        kind: {key: round(v, 4) for key, v in snr(stacked[:, kinds_array == kind]).items() if key != "estimates"}
        for kind in sorted(set(kinds))
    }
    seconds_per_sample = sum(m["seconds_sampling"] + m["seconds_training"] for m in history) / (
        per_epoch * len(history)
    )
    ratio = result["signal_to_noise_per_step"]
    needed = effective / ratio if ratio > 0 else None  # None: no signal above the estimates' own noise
    return {
        "overrides": args,
        **result,
        "effective_batch": effective,
        "samples_for_snr_1": needed and round(needed, 1),
        "cpu_seconds_for_snr_1": needed and round(needed * seconds_per_sample, 1),
        "seconds_per_sample": round(seconds_per_sample, 3),
        "reward_mean": round(float(np.mean([m["reward_mean"] for m in history])), 4),
        # the weights never move, so these stay exactly 1 and 0: a check that nothing was stepped
        "ratio": float(np.mean([m["ratio"] for m in history])),
        "clipfrac": float(max(m["clipfrac"] for m in history)),
        "wall_seconds": round(wall, 1),
    }


def main() -> None:
    args = sys.argv[1:]
    steps, variants = 16, [""]
    if "--steps" in args:
        i = args.index("--steps")
        steps, args = int(args[i + 1]), args[:i] + args[i + 2 :]
    if "--variants" in args:
        i = args.index("--variants")
        variants, args = ["", *args[i + 1].split(";")], args[:i] + args[i + 2 :]
    torch.set_num_threads(2)
    baseline = None
    for variant in variants:
        result = measure([*args, *shlex.split(variant)], steps)
        baseline = baseline or result
        ours, theirs = result["cpu_seconds_for_snr_1"], baseline["cpu_seconds_for_snr_1"]
        result["cpu_seconds_vs_baseline"] = round(ours / theirs, 3) if ours and theirs else None
        print(json.dumps({"benchmark": "gradient_snr", **result}), flush=True)


if __name__ == "__main__":
    main()
