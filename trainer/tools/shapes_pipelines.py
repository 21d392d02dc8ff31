"""The tiny-shapes pipelines untrained: ``build`` (tiny-shapes, a small Stable Diffusion: CLIP text encoder, UNet,
f8 VAE) and ``build_sd3`` (tiny-shapes-sd3, an SD3 MMDiT on tiny-shapes' VAE and tokenizer), the architectures
``python -m trainer.tools.shapes_model`` pretrains (trainer/tools/shapes_model.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from scorers import world

WORDS = sorted({w for captions in world.CAPTIONS.values() for c in captions for w in c.split()} | {"s"})
SPEC = {
    "text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
    "unet": {
        "block_out_channels": [64, 128],
        "layers_per_block": 1,
        "attention_head_dim": 16,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    },
    "vae": {"block_out_channels": [16, 32, 64, 64], "layers_per_block": 1, "norm_num_groups": 8},
    # --family sd3: one latent pixel per token (patch 1: 64 image tokens; the 77 CLIP and 256 zero T5 tokens
    # the pipeline appends make the text stream the larger one), SD3's shift 3 for sampling
    "transformer": {"patch_size": 1, "num_layers": 4, "attention_head_dim": 32, "num_attention_heads": 4},
    "projection_dim": 32,
    "shift": 3.0,
}
SHAPES_SD1 = Path(__file__).parent.parent / "weights" / "tiny-shapes"  # the sd3 family's VAE, tokenizer and text start


def build(seed: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from scorers.tiny_models import clip_tokenizer
    from trainer.families.tiny_pipeline import assemble_pipeline, clip_text_encoder

    torch.manual_seed(seed)
    tokenizer = clip_tokenizer(WORDS)
    text_encoder = clip_text_encoder(CLIPTextModel, SPEC["text"], tokenizer)
    unet = UNet2DConditionModel(
        sample_size=world.RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        cross_attention_dim=SPEC["text"]["hidden_size"],
        norm_num_groups=32,
        **SPEC["unet"],
    )
    blocks = SPEC["vae"]["block_out_channels"]
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks),
        latent_channels=4,
        sample_size=world.RESOLUTION,
        **SPEC["vae"],
    )
    return assemble_pipeline(text_encoder, tokenizer, unet, vae)


def build_sd3(seed: int):
    """A StableDiffusion3Pipeline as trainer/families/tiny_pipeline.py's tiny-sd3 (the CLIP pair with projections,
    no T5), on tiny-shapes' VAE and tokenizer, both text encoders initialised from tiny-shapes' (fresh
    projections)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    from trainer.families.zero_t5 import use_one_zero_token

    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(SHAPES_SD1 / "tokenizer")
    encoders = [
        CLIPTextModelWithProjection.from_pretrained(
            SHAPES_SD1 / "text_encoder", dtype=torch.float32, projection_dim=SPEC["projection_dim"]
        )
        for _ in range(2)
    ]
    vae = AutoencoderKL.from_pretrained(SHAPES_SD1 / "vae", dtype=torch.float32).requires_grad_(False)
    hidden = SPEC["text"]["hidden_size"]
    heads, width = SPEC["transformer"]["num_attention_heads"], SPEC["transformer"]["attention_head_dim"]
    size = world.RESOLUTION // 8
    transformer = SD3Transformer2DModel(
        sample_size=size,
        in_channels=4,
        out_channels=4,
        pos_embed_max_size=size // SPEC["transformer"]["patch_size"],
        joint_attention_dim=2 * hidden,
        caption_projection_dim=heads * width,
        pooled_projection_dim=2 * SPEC["projection_dim"],
        **SPEC["transformer"],
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=SPEC["shift"]),
        vae=vae,
        text_encoder=encoders[0],
        tokenizer=tokenizer,
        text_encoder_2=encoders[1],
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    use_one_zero_token(pipe)
    return pipe
