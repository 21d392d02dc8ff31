"""Our sampler (log-probs, stored trajectory) vs each family's own diffusers pipeline call: same model, steps,
guidance, batch.

    python -m bench.sampling_overhead [--families tiny,tiny-sdxl,tiny-sd3,tiny-flux,tiny-flux2,tiny-qwenimage,
                                      tiny-zimage,tiny-wan]
                                      [--steps 20] [--batch 8] [--repeats 7]

Prints JSON with the median seconds of each and their ratio per family (target <= 1.10). Both decode to uint8
images (Wan: videos, at its preset's size and frames); ours samples the policy's noise (DDIM eta 1, Flow-GRPO's SDE
at its noise level), the pipelines their defaults (DDIM eta 1 asked for; SD3's, FLUX's, FLUX.2's, Qwen-Image's,
Z-Image's and Wan's ODE).
"""

from __future__ import annotations

import argparse
import json

import torch

from bench.timing import interleaved_medians


def measure(preset: str, steps: int, batch: int, repeats: int) -> dict:
    from trainer.config import Config
    from trainer.families.models import load_family, make_trainable
    from trainer.sampling import sample

    cfg = Config(preset=preset)
    family = load_family(cfg, torch.device("cpu"))
    make_trainable(family.denoiser, cfg)  # LoRA adapters in both measurements, as in training
    pipe, guidance, eta = family.pipe, cfg.sample.guidance_scale, cfg.sample.eta
    size = cfg.sample.resolution or family.native_resolution()
    width = getattr(family, "width", None) or size  # a video family's own width (Wan), else square
    prompts = ["a photo of a cat"] * batch
    negative = family.encode_prompts([""])
    # DDIM's eta for SD1/SDXL; FLUX's T5 and FLUX.2's Qwen3 tokens as ours encode them (the pipelines' default:
    # 512); Qwen-Image's guidance is true CFG on the negative prompt ours uses (its guidance_scale is a distilled
    # model's input)
    tokens = {"max_sequence_length": getattr(family, "max_sequence_length", None)}
    extra = {
        "SD3": {},
        "Flux": tokens,
        "Flux2": tokens,
        "QwenImage": {"true_cfg_scale": guidance, "negative_prompt": [""] * batch, "guidance_scale": None},
        "ZImage": tokens,
        "Wan": {**tokens, "num_frames": getattr(family, "num_frames", None)},
    }.get(type(family).__name__, {"eta": 1.0})
    # ZImagePipeline's guidance_scale g is pos + g (pos - neg): our w - 1 (trainer/families/zimage.py)
    theirs_guidance = guidance - 1 if type(family).__name__ == "ZImage" else guidance

    def ours():
        _, final = sample(family, family.denoiser, prompts, [{}] * batch, negative, steps, eta, guidance, size)
        return family.vae.to_uint8(final)

    def theirs():
        out = pipe(
            prompt=list(prompts),  # by name (Flux2KleinPipeline's first argument is its image); a copy (ZImagePipeline
            # writes its chat-templated prompts into the list)
            num_inference_steps=steps,
            height=size,
            width=width,
            output_type="np",
            # one guidance_scale (the merge had it twice: a TypeError), Qwen-Image's extra setting it to None
            **{"guidance_scale": theirs_guidance, **extra},
        )
        return out.frames if hasattr(out, "frames") else out.images  # WanPipeline's videos

    med = interleaved_medians({"ours": ours, "diffusers": theirs}, repeats)
    return {
        "family": type(family).__name__,
        "pipeline": type(pipe).__name__,
        "median_seconds": {k: round(v, 4) for k, v in med.items()},
        "ratio_ours_vs_diffusers": round(med["ours"] / med["diffusers"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--families",
        default="tiny,tiny-sdxl,tiny-sd3,tiny-flux,tiny-flux2,tiny-qwenimage,tiny-zimage,tiny-wan",
        help="presets of the tiny models",
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    results = {preset: measure(preset, args.steps, args.batch, args.repeats) for preset in args.families.split(",")}
    print(
        json.dumps(
            {
                "benchmark": "sampling_overhead",
                "steps": args.steps,
                "batch": args.batch,
                "torch_threads": torch.get_num_threads(),
                "families": results,
                "target": "<= 1.10",
                "worst_ratio": max(r["ratio_ours_vs_diffusers"] for r in results.values()),
            }
        )
    )


if __name__ == "__main__":
    main()
