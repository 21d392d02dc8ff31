"""Aesthetic scorer throughput on a GPU: a random-init CLIP-L-shaped model, images/s at several batch sizes.

    python -m bench.aesthetic_gpu [--batches 1 8 32 64] [--device cuda] [--smoke]

Builds CLIP with ViT-L/14's vision tower (width 1024, 24 layers, 16 heads, MLP 4096, 224 px, patch 14,
projection 768) and a random LAION-layout MLP, loads them through ``AestheticScorer`` exactly as a real
checkpoint, and times ``score`` on 512 px uint8 images (the processor resizes them, as in a run). Prints
JSON: images/s per batch size, the speed-up over batch 1, peak GPU memory. ``--smoke`` runs a tiny model on
the CPU to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from bench.timing import median_seconds

CLIP_L = {
    "seed": 7,
    "hidden": 1024,
    "intermediate": 4096,
    "layers": 24,
    "heads": 16,
    "image_size": 224,
    "patch": 14,
    "projection": 768,
}
SMOKE = {"seed": 7, "hidden": 32, "layers": 2, "heads": 4, "image_size": 32, "patch": 8, "projection": 16}


def main() -> None:
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="tiny model, 64 px images: checks the script on CPU")
    args = parser.parse_args()

    from scorers.aesthetic import AestheticScorer
    from scorers.tiny_models import build_aesthetic_mlp, build_clip

    spec, size = (SMOKE, 64) if args.smoke else (CLIP_L, 512)
    result = {"benchmark": "aesthetic_gpu", "device": args.device, "model": spec, "image_px": size}
    if args.device.startswith("cuda"):
        result["gpu"] = torch.cuda.get_device_name(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        build_clip(Path(tmp) / "clip", spec)
        build_aesthetic_mlp(Path(tmp) / "mlp.safetensors", spec["projection"])
        scorer = AestheticScorer(str(Path(tmp) / "clip"), str(Path(tmp) / "mlp.safetensors"))
        scorer.load(args.device)
    rng = np.random.default_rng(0)
    rates = {}
    for batch in args.batches:
        images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
        prompts, metadata = [""] * batch, [{}] * batch
        # score returns numpy, so each timing includes the GPU finishing its work
        rates[batch] = batch / median_seconds(lambda: scorer.score(images, prompts, metadata), args.repeats)
    result["images_per_s"] = {str(b): round(r, 1) for b, r in rates.items()}
    result["speedup_vs_batch_1"] = {str(b): round(r / rates[args.batches[0]], 2) for b, r in rates.items()}
    if args.device.startswith("cuda"):
        result["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated(args.device) / 1e9, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
