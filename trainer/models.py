"""Loading the pipeline and making the UNet trainable (LoRA adapters or full), with mixed-precision placement."""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.config import Config

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load_pipeline(cfg: Config, device: torch.device):
    """The diffusers pipeline with a DDIM scheduler; frozen parts in the mixed-precision dtype."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    path = cfg.pretrained.model
    if path == "tiny":
        from trainer.tiny_pipeline import tiny_pipeline_path

        path = str(tiny_pipeline_path(cfg.pretrained.cache_dir))
    import diffusers

    dtype = DTYPES[cfg.run.mixed_precision]
    # diffusers renamed torch_dtype to dtype in 0.36 and warns about the old name.
    dtype_arg = "dtype" if tuple(map(int, diffusers.__version__.split(".")[:2])) >= (0, 36) else "torch_dtype"
    pipe = StableDiffusionPipeline.from_pretrained(
        path, revision=cfg.pretrained.revision, safety_checker=None, requires_safety_checker=False, **{dtype_arg: dtype}
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    from trainer.ddim import check_scheduler

    check_scheduler(pipe.scheduler, cfg.sample.num_steps)  # before the weights move to the device
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.vae, pipe.text_encoder, pipe.unet):
        module.requires_grad_(False).to(device)
    if not cfg.train.lora and dtype != torch.float32:
        pipe.unet.to(dtype=torch.float32)  # full finetuning keeps fp32 master weights; LoRA's base stays half
    return pipe


def make_trainable(unet, cfg: Config) -> dict[str, torch.nn.Parameter]:
    """Adapters (or the whole UNet) set to train; returns them by name (the names checkpoints use)."""
    if not cfg.train.lora:
        unet.requires_grad_(True)
        return dict(unet.named_parameters())
    from peft import LoraConfig

    unet.add_adapter(
        LoraConfig(
            r=cfg.train.lora_rank,
            lora_alpha=cfg.train.lora_alpha,
            init_lora_weights="gaussian",
            target_modules=cfg.train.lora_targets,
        )
    )
    params = {name: p for name, p in unet.named_parameters() if p.requires_grad}
    for p in params.values():  # adapters train in fp32 whatever the base dtype
        p.data = p.data.float()
    return params


def save_weights(unet, cfg: Config, output_dir: Path) -> Path:
    """LoRA in diffusers format (``pipeline.load_lora_weights``) or a full UNet folder."""
    if not cfg.train.lora:
        unet.save_pretrained(output_dir / "unet")
        return output_dir / "unet"
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    # peft-format keys on purpose: convert_state_dict_to_diffusers renames attention keys to the old
    # lora.down/up form but leaves conv keys alone, and load_lora_weights then drops the attention adapters.
    layers = get_peft_model_state_dict(unet)
    StableDiffusionPipeline.save_lora_weights(output_dir / "lora", unet_lora_layers=layers, safe_serialization=True)
    return output_dir / "lora"
