"""SD1.5-sized DDPO on a GPU: peak memory of LoRA training at 512 px and sampling images/s.

    python -m bench.sd15_gpu [--sample-batch 8] [--steps 50] [--timesteps-per-forward 1] [--smoke]

Builds a random-init pipeline with Stable Diffusion 1.5's shapes (UNet 320/640/1280/1280 with 2 layers per
block and cross-attention 768, VAE 128/256/512/512, CLIP text encoder 768 x 12 layers), saves it and runs
one epoch of the real trainer on it (fp16, LoRA rank 4 on attention, train batch 1, the sd15 preset's
other settings), then reports the epoch's sampling images/s and the peak GPU memory, which training sets
(target <= 7 GB at one timestep per forward; ddpo-pytorch claims < 10 GB), next to what
``bench.gpu_estimate`` predicts for the same batches without a GPU. ``--smoke`` runs the embedded tiny
pipeline on the CPU to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def build_sd15_shaped(folder: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from scorers.tiny_models import clip_tokenizer
    from trainer.families.tiny_pipeline import SPEC, assemble_pipeline, clip_text_encoder

    torch.manual_seed(0)
    tokenizer = clip_tokenizer(SPEC["vocabulary"])
    text_encoder = clip_text_encoder(
        CLIPTextModel,
        {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
        tokenizer,
    )
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # diffusers' defaults are SD1's blocks
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    assemble_pipeline(text_encoder, tokenizer, unet, vae).save_pretrained(folder)


def main() -> None:
    import torch
    from pydantic_settings import CliApp

    from trainer.config import Config
    from trainer.algorithms.ddpo.loop import train

    parser = argparse.ArgumentParser()
    parser.add_argument("--sample-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--timesteps-per-forward", type=int, default=1, help="train.timesteps_per_forward")
    parser.add_argument("--smoke", action="store_true", help="the tiny pipeline on CPU: checks the script")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            model, overrides = (
                "tiny",
                [
                    "--run.mixed_precision",
                    "no",
                    "--sample.num_steps",
                    "4",
                    "--sample.batch_size",
                    "2",
                    "--sample.num_batches_per_epoch",
                    "1",
                ],
            )
        else:
            model = str(Path(tmp) / "sd15-shaped")
            build_sd15_shaped(Path(model))
            overrides = [
                "--run.mixed_precision",
                "fp16",
                "--sample.num_steps",
                str(args.steps),
                "--sample.batch_size",
                str(args.sample_batch),
                "--sample.num_batches_per_epoch",
                "1",
            ]
        cfg = CliApp.run(
            Config,
            cli_args=[
                "--preset",
                "sd15-compressibility-1gpu",
                "--pretrained.model",
                model,
                "--run.num_epochs",
                "1",
                "--run.output_dir",
                str(Path(tmp) / "run"),
                "--run.log_with",
                "none",
                "--run.log_images_every",
                "0",
                "--train.gradient_accumulation_steps",
                "1",
                "--train.timesteps_per_forward",
                str(args.timesteps_per_forward),
                *overrides,
            ],
        )
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        [epoch] = train(cfg)
    result = {
        "benchmark": "sd15_gpu",
        "model": model if args.smoke else "random-init SD1.5-shaped",
        "resolution": 512 if not args.smoke else None,
        "num_steps": cfg.sample.num_steps,
        "sample_batch": cfg.sample.batch_size,
        "mixed_precision": cfg.run.mixed_precision,
        "lora": {"rank": cfg.train.lora_rank, "targets": cfg.train.lora_targets},
        "train_batch": cfg.train.batch_size,
        "sampling_images_per_s": round(cfg.sample.batch_size / epoch["seconds_sampling"], 3),
        "training_seconds": round(epoch["seconds_training"], 2),
    }
    if torch.cuda.is_available():
        result["gpu"] = torch.cuda.get_device_name()
        result["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        result["target"] = "<= 7 GB"
    if not args.smoke:
        result["estimated_peak_gb"] = estimated_peak(
            cfg.train.batch_size * args.timesteps_per_forward, cfg.sample.batch_size
        )
    print(json.dumps(result))


def estimated_peak(train_samples: int, sample_batch: int) -> float:
    """bench.gpu_estimate's need for these batches (the larger of a training forward and a sampling batch)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from bench.gpu_estimate import estimate

    e = estimate("sd15", [512], FakeTensorMode(allow_non_fake_inputs=True))["sd15@512"]
    slope = max(e["sampling"]["per_sample_gb"]["total"], e["decode"]["per_sample_gb"]["total"])
    train = e["need_gb_at_batch1"]["train"] + (train_samples - 1) * e["train"]["per_sample_gb"]["total"]
    return round(max(train, e["need_gb_at_batch1"]["sampling"] + (sample_batch - 1) * slope), 2)


if __name__ == "__main__":
    main()
