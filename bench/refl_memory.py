"""Peak GPU memory of one ReFL step on SD1.5 with the reward in process or served, estimated without a GPU.

    python -m bench.refl_memory [--batches 1,2] [--skip-calibration]

The step is trainer/algorithms/refl/loop.py's at its ``mid`` step, with the sd15-refl-aesthetic preset's settings (fp16,
LoRA on attention, gradient checkpointing on and off, no CFG): the UNet call with gradient, the predicted x0, the
VAE decode with gradient, the reward, ``relu(2 - r).mean() * 1e-3``, backward, gradient clipping, AdamW.
The reward is either in process, the aesthetic scorer's own tensor path (CLIP ViT-L/14 in fp16 as
the scorers load it on a GPU, the LAION MLP) or served: what trainer.rewards.remote_scores leaves on the
trainer's GPU, the server's float32 gradient of the pixels kept for backward. Built random-init from the
published configs on the meta device and made fake; bench.gpu_estimate's live-bytes tracker and CUDA
autocast policy measure the peak (see that module for how). Calibration runs the same step with the repo's
tiny models, fake and for real on the CPU (the CPU allocator's own peak).

Prints JSON: per batch and checkpointing, the peak by category for both rewards and what serving saves.
"""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import torch

from bench.gpu_estimate import (
    BLOCK,
    CLIP_L,
    SD15_UNET,
    SD_VAE,
    CudaAutocast,
    checkpointing_under,
    denoiser,
    gb,
    measure,
)
from scorers.aesthetic import AestheticMLP, AestheticScorer

# openai/clip-vit-large-patch14's vision tower (the text tower is CLIP_L), projection 768
VIT_L14 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 224,
}
MID = 35  # a step of [30, 39] out of 40; the memory does not depend on which


def served(images: torch.Tensor) -> torch.Tensor:
    """What the served reward costs the trainer: trainer.rewards.remote_scores keeps the server's float32
    gradient of the pixels for backward and returns one score per image (no reward model here)."""

    class Served(torch.autograd.Function):
        @staticmethod
        def forward(ctx, pixels):
            ctx.save_for_backward(torch.zeros(pixels.shape, dtype=torch.float32))
            return torch.zeros(len(pixels), dtype=torch.float32)

        @staticmethod
        def backward(ctx, grad_scores):
            (gradients,) = ctx.saved_tensors
            return grad_scores[:, None, None, None] * gradients

    return Served.apply(images)


def sd15(fake, unet=None, vae=None):
    """SD1's family (trainer/families/sd1.py) around a fake UNet with the preset's LoRA and a fake fp16 VAE."""
    from diffusers import AutoencoderKL, DDIMScheduler

    from trainer.config.presets import PRESETS
    from trainer.families.sd1 import SD1

    if unet is None:
        unet = denoiser(SD15_UNET, torch.float16, PRESETS["sd15-refl-aesthetic"]["train"], fake)
    if vae is None:
        with torch.device("meta"):
            vae = AutoencoderKL.from_config(SD_VAE).to(torch.float16)
        with fake:
            vae.to_empty(device="cpu")
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    family = SD1(SimpleNamespace(unet=unet, vae=vae.requires_grad_(False), scheduler=scheduler, vae_scale_factor=8))
    family.dynamics.timesteps(40, "cpu")
    return family


def aesthetic(fake) -> AestheticScorer:
    """The aesthetic scorer as ``load("cuda")`` leaves it (CLIP in fp16, MLP in fp32), its weights fake."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    scorer = AestheticScorer()
    with torch.device("meta"):
        model = CLIPModel(CLIPConfig(text_config=CLIP_L, vision_config=VIT_L14, projection_dim=768)).to(torch.float16)
        mlp = AestheticMLP(768)
    with fake:
        model.to_empty(device="cpu"), mlp.to_empty(device="cpu")
    clip = scorer.clip
    clip.torch, clip.device, clip.dtype, clip.model = torch, "cpu", torch.float16, model.eval().requires_grad_(False)
    clip.processor = CLIPImageProcessor()  # 224 shortest edge, 224 crop, OpenAI's mean and std: CLIP-L's
    scorer.mlp = mlp.eval().requires_grad_(False)
    return scorer


def refl_step(family, reward, n: int, resolution: int, fake, checkpointing: bool, block: int = BLOCK) -> dict:
    """Measure one ReFL step of batch ``n``; ``reward`` an in-process scorer or None (served)."""
    unet = family.pipe.unet
    if checkpointing:
        unet.enable_gradient_checkpointing(checkpointing_under(torch.float16))
    else:
        unet.disable_gradient_checkpointing()
    modules = torch.nn.ModuleList([unet, family.pipe.vae, *([reward.clip.model, reward.mlp] if reward else [])])
    with fake if fake is not None else torch.device("cpu"):
        trainable = [p for p in unet.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-5)
        for p in trainable:  # the optimizer state every step after the first finds
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        latents = torch.randn(n, 4, resolution // 8, resolution // 8)
        cond = torch.randn(n, 77, unet.config.cross_attention_dim, dtype=torch.float16)
        timesteps = family.pipe.scheduler.timesteps[MID].expand(n).clone()

        def step():
            with CudaAutocast(torch.float16):
                output = family.predict(unet, latents, timesteps, cond, None, 1.0)
            images = family.vae.decode(family.dynamics.predicted_x0(output, MID, latents))
            rewards = reward.score_tensor(images, [""] * n) if reward else served(images)
            (torch.relu(2.0 - rewards).mean() * 1e-3).backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()

        result = measure(step, modules, optimizer, [latents, cond], block, profile=fake is None)
        optimizer.zero_grad(set_to_none=True)
    return result


def estimate(batches) -> dict:
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake = FakeTensorMode(allow_non_fake_inputs=True)
    family, scorer = sd15(fake), aesthetic(fake)
    reward_weights = sum(p.nbytes for m in (scorer.clip.model, scorer.mlp) for p in m.parameters())
    out = {"reward_weights_gb": gb(reward_weights)}
    for n in batches:
        for checkpointing in (True, False):
            local = refl_step(family, scorer, n, 512, fake, checkpointing)
            remote = refl_step(family, None, n, 512, fake, checkpointing)
            out[f"batch{n}{'_checkpointed' if checkpointing else ''}"] = {
                "local_gb": {**{k: gb(v) for k, v in local["by_category"].items()}, "total": gb(local["peak"])},
                "served_gb": {**{k: gb(v) for k, v in remote["by_category"].items()}, "total": gb(remote["peak"])},
                "saved_gb": gb(local["peak"] - remote["peak"]),
                "saved_beyond_reward_weights_gb": gb(local["peak"] - remote["peak"] - reward_weights),
                "served_over_local": round(remote["peak"] / local["peak"], 3),
            }
    return out


def calibrate(n: int = 2) -> dict:
    """The same step on the tiny pipeline and the tiny CLIP's aesthetic scorer: fake against real (CPU)."""
    from diffusers import AutoencoderKL
    from torch._subclasses.fake_tensor import FakeTensorMode

    from scorers.scorer import create_scorer
    from trainer.families import tiny_pipeline
    from trainer.config.presets import PRESETS

    path, train = tiny_pipeline.tiny_pipeline_path(), PRESETS["sd15-refl-aesthetic"]["train"]
    unet_config = json.loads((path / "unet" / "config.json").read_text())
    resolution = unet_config["sample_size"] * 8
    real_scorer = create_scorer("aesthetic", checkpoint="tiny")
    real_scorer.load("cpu")
    out = {}
    for checkpointing in (False, True):
        fake = FakeTensorMode(allow_non_fake_inputs=True)
        with torch.device("meta"):
            vae = AutoencoderKL.from_config(json.loads((path / "vae" / "config.json").read_text())).to(torch.float16)
        with fake:
            vae.to_empty(device="cpu")
        fake_scorer = create_scorer("aesthetic", checkpoint="tiny")
        fake_scorer.load("cpu")
        with fake:
            for m in (fake_scorer.clip.model, fake_scorer.mlp):
                m.to_empty(device="cpu")
        guess = refl_step(
            sd15(fake, denoiser(unet_config, torch.float16, train, fake), vae),
            fake_scorer,
            n,
            resolution,
            fake,
            checkpointing,
            block=1,
        )
        real_vae = AutoencoderKL.from_pretrained(path / "vae").to(torch.float16)
        real = sd15(None, denoiser(unet_config, torch.float16, train, pretrained=str(path / "unet")), real_vae)
        got = refl_step(real, real_scorer, n, resolution, None, checkpointing, block=1)
        out["checkpointed" if checkpointing else "plain"] = {
            "batch": n,
            "estimated_bytes": guess["peak"],
            "allocator_bytes": got["allocator_peak"],
            "tracked_real_bytes": got["peak"],
            "rel_error": round(guess["peak"] / got["allocator_peak"] - 1, 4),
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,2", help="per-GPU batch sizes (the preset's is 2)")
    parser.add_argument("--skip-calibration", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = {
        "benchmark": "refl_memory",
        "model": "SD1.5 UNet + VAE at 512 px, LoRA (sd15-refl-aesthetic)",
        "reward": "aesthetic (CLIP ViT-L/14 fp16 + LAION MLP) in process vs served (/v1/score_grad)",
        "sd15": estimate([int(b) for b in args.batches.split(",")]),
    }
    if not args.skip_calibration:
        result["calibration_tiny"] = calibrate()
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
