"""Diffusion-DPO's data pipeline against the demand of its training step.

    python -m bench.dpo_data [--pairs 48] [--resolution 512] [--workers 0,1,2]

Supply: Pick-a-Pic-like parquet (JPEG pairs of 512, 768 and 1024 px, shapes-world renders upscaled with
noise so that they compress like photographs), read by trainer/pairs.py's loader at ``--resolution``
(decode, resize, crop, flip) in batches of 4: pairs/s per worker count, after a warm-up batch.

Demand, two ways. Measured here: a real DPO run on the tiny pipeline at the same resolution with one
worker, the share of its step time spent waiting for data (``data_wait_share`` in metrics.jsonl). On a GPU,
from FLOPs: one pair is the policy's forward and backward on two images plus the reference's forward on two,
counted on SD1.5's real UNet by bench/gpu_estimate.py on fake tensors (no GPU needed); at a sustained
throughput of 100 / 200 / 400 TFLOP/s (an assumption: roughly 30-40% of an A100's / H100's bf16 peak) that
is the pairs/s the step consumes, and the decoding workers it needs at this machine's per-worker rate
(the seed and our presets use 16).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def pickapic_like(folder: Path, n: int, seed: int = 0) -> None:
    from PIL import Image

    from scorers import world
    from trainer.pairs import jpeg, write_parquet

    rng = np.random.default_rng(seed)
    captions = world.CAPTIONS["two_object"]
    rows = []
    for i in range(n):
        size = (512, 768, 1024)[i % 3]
        images = []
        for k in range(2):
            small = Image.fromarray(world.render(captions[i % len(captions)], seed + 2 * i + k))
            big = np.asarray(small.resize((size, size), Image.BICUBIC)).astype(np.int16)
            images.append(jpeg(np.clip(big + rng.normal(0, 6, big.shape), 0, 255).astype(np.uint8), quality=90))
        rows.append(
            {"caption": captions[i % len(captions)], "jpg_0": images[0], "jpg_1": images[1], "label_0": float(i % 2)}
        )
    write_parquet(rows, folder / "train-00000.parquet")


def supply(folder: Path, resolution: int, workers: int, batches: int) -> float:
    """Pairs/s of the loader (after its first batch, which includes starting the workers)."""
    from trainer.pairs import PairBatches, Pairs, load_pairs, loader

    pairs = load_pairs(str(folder))
    data = iter(loader(Pairs(pairs, resolution, seed=0, hflip=True), PairBatches(len(pairs), 4, 1, 0, seed=0), workers))
    next(data)
    start = time.perf_counter()
    for _ in range(batches):
        next(data)
    return 4 * batches / (time.perf_counter() - start)


def measured_wait(folder: Path, resolution: int, steps: int = 6) -> dict:
    from trainer.config import Config
    from trainer.algorithms.dpo.loop import train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = Config(
            algorithm="dpo",
            run={"output_dir": tmp, "log_with": "none"},
            sample={"resolution": resolution},
            train={"batch_size": 2, "learning_rate": 1e-4},
            dpo={
                "dataset": str(folder),
                "max_train_steps": steps,
                "checkpointing_steps": 0,
                "dataloader_num_workers": 1,
            },
        )
        history = train(cfg)[1:]  # the first step starts the worker
    return {
        "model": "tiny (random-init SD1 shape)",
        "resolution": resolution,
        "train_batch_pairs": 2,
        "seconds_per_step": round(float(np.median([m["seconds_step"] for m in history])), 3),
        "data_wait_share": round(float(np.mean([m["data_wait_share"] for m in history])), 4),
    }


def sd15_pair_flops(resolution: int) -> float:
    """FLOPs of one pair of a DPO step on SD1.5's UNet (no CFG): the train step of bench.gpu_estimate is one
    guided sample (2 forwards) with backward, the same as the policy's forward and backward on 2 images;
    its sampling step is 2 forwards, the reference's on the pair. The VAE encode is left out."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from bench.gpu_estimate import FAMILIES, Step, denoiser, run_step, training
    from trainer.config.presets import PRESETS

    family, preset = FAMILIES["sd15"], PRESETS[FAMILIES["sd15"]["preset"]]
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    step = Step(
        denoiser(family["config"], family["dtype"], preset["train"], fake),
        family["dtype"],
        preset["sample"],
        training(preset),  # DDPO's step: its clip range is in the ddpo group
    )
    return (
        run_step(step, "train", 1, resolution, fake)["flops"] + run_step(step, "sampling", 1, resolution, fake)["flops"]
    )


def main(argv: list[str] | None = None) -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--batches", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the loader's decode is PIL's; one thread leaves the other core to a worker
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        pickapic_like(folder, args.pairs)
        rates = {
            int(w): round(supply(folder, args.resolution, int(w), args.batches), 2) for w in args.workers.split(",")
        }
        wait = measured_wait(folder, args.resolution)
    flops = sd15_pair_flops(args.resolution)
    per_worker = rates.get(1) or max(rates.values())
    demand = {f"{t}_TFLOPs": round(t * 1e12 / flops, 2) for t in (100, 200, 400)}
    print(
        json.dumps(
            {
                "benchmark": "dpo_data",
                "resolution": args.resolution,
                "supply_pairs_per_s_by_workers": rates,
                "measured_here": wait,
                "sd15_dpo_pair_tflops": round(flops / 1e12, 3),
                "gpu_demand_pairs_per_s": demand,
                "workers_needed_at_this_machines_rate": {k: int(np.ceil(v / per_worker)) for k, v in demand.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
