"""Our sampler (log-probs, stored trajectory) vs diffusers' own pipeline call: same model, steps, batch.

    python -m bench.sampling_overhead [--steps 20] [--batch 8] [--repeats 7]

Prints JSON with the median seconds of each and their ratio (target <= 1.10). Both decode to uint8 images.
"""

from __future__ import annotations

import argparse
import json

import torch

from bench.timing import interleaved_medians


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    from trainer.config import Config
    from trainer.models import load_pipeline, make_trainable
    from trainer.models import family_of
    from trainer.sampling import sample

    cfg = Config()
    pipe = load_pipeline(cfg, torch.device("cpu"))
    make_trainable(pipe.unet, cfg)  # LoRA adapters in both measurements, as in training
    prompts = ["a photo of a cat"] * args.batch
    negative = family_of(pipe).encode_prompts([""])

    def ours():
        _, final = sample(family_of(pipe), pipe.unet, prompts, [{}] * args.batch, negative, args.steps, 1.0, 5.0, 64)
        return family_of(pipe).to_uint8(final)

    def theirs():
        return pipe(prompts, num_inference_steps=args.steps, guidance_scale=5.0, eta=1.0, height=64, width=64, output_type="np").images

    med = interleaved_medians({"ours": ours, "diffusers": theirs}, args.repeats)
    print(json.dumps({
        "benchmark": "sampling_overhead", "steps": args.steps, "batch": args.batch, "torch_threads": torch.get_num_threads(),
        "median_seconds": {k: round(v, 4) for k, v in med.items()},
        "ratio_ours_vs_diffusers": round(med["ours"] / med["diffusers"], 3), "target": "<= 1.10",
    }))


if __name__ == "__main__":
    main()
