"""Bytes the stored trajectories hold per sample, now and in the layout before (from the stored tensors).

    python -m bench.trajectory_memory [--preset tiny] [--steps 20] [--batch 8]

Samples one batch with the real sampler and counts the storages its Trajectories hold (each counted once,
however many views). The layout before stored x_t and x_{t-1} as two stacks of T latents, and training
gathered a shuffled copy of every per-step tensor of the whole epoch up front; both are rebuilt here from
the same tensors to count them. Prints JSON: bytes per sample at rest and while training, and the ratios.
"""

from __future__ import annotations

import argparse
import json

import torch


def nbytes(*tensors) -> int:
    storages = {}
    for t in tensors:
        for leaf in t.values() if isinstance(t, dict) else [t]:
            storages[leaf.untyped_storage().data_ptr()] = leaf.untyped_storage().nbytes()
    return sum(storages.values())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from trainer.config import Config
    from trainer.families.models import load_family
    from trainer.sampling import sample

    family = load_family(Config(preset=args.preset), torch.device("cpu"))
    negative = family.encode_prompts([""])
    batch, _ = sample(
        family,
        family.denoiser,
        ["a cat"] * args.batch,
        [{}] * args.batch,
        negative,
        args.steps,
        1.0,
        5.0,
        family.native_resolution(),
    )
    per_step = (batch.log_probs, batch.timesteps, batch.steps)
    now = nbytes(batch.path, batch.prompt_embeds, *per_step)
    # before: two stacks of T latents, and training's shuffled copy of all per-step tensors of the epoch
    latents, next_latents = batch.latents.clone(), batch.next_latents.clone()
    before = nbytes(latents, next_latents, batch.prompt_embeds, batch.log_probs, batch.timesteps)
    shuffled_copy = nbytes(latents.clone(), next_latents.clone(), batch.log_probs.clone(), batch.timesteps.clone())
    # now training gathers one chunk at a time (train.batch_size samples); count one chunk of all steps
    chunk = batch.chunk(torch.arange(min(4, args.batch)), torch.arange(args.steps).repeat(min(4, args.batch), 1))
    chunk_bytes = nbytes(chunk.latents, chunk.next_latents, chunk.log_probs, chunk.timesteps, chunk.steps)
    n = args.batch
    print(
        json.dumps(
            {
                "benchmark": "trajectory_memory",
                "preset": args.preset,
                "steps": args.steps,
                "samples": n,
                "bytes_per_sample_at_rest": {"before": before // n, "now": now // n},
                "bytes_per_sample_while_training": {
                    "before": (before + shuffled_copy) // n,
                    "now": now // n,
                    "one_training_chunk_now_bytes": chunk_bytes,
                },
                "ratio_now_vs_before": {
                    "at_rest": round(now / before, 3),
                    "training": round(now / (before + shuffled_copy), 3),
                },
            }
        )
    )


if __name__ == "__main__":
    main()
