"""A tiny Wan text-to-video pipeline (Wan-AI/Wan2.1-T2V-1.3B's shape; diffusers' WanPipeline), built offline from the
real classes with tiny configs and saved with ``save_pretrained``, as trainer/families/tiny_pipeline.py builds the
others.

Wan's shape in miniature: a WanTransformer3DModel (self-attention over (1, 2, 2) patches of the video latents with 3-D
rotary positions, cross-attention to the text, AdaLN on the timestep) on 16-channel latents, a UMT5 text encoder
(google/umt5-xxl's class, UMT5EncoderModel) with a word-level tokenizer ending each text with </s> as T5's, the Wan VAE
(AutoencoderKLWan: causal 3-D convolutions, x8 in space and x4 in time, the real checkpoints' per-channel
latents_mean/latents_std, its config's defaults), and a FlowMatchEulerDiscreteScheduler with Wan's 480p flow shift 3
(the real checkpoints ship a UniPCMultistepScheduler, which trainer/families/wan.py replaces by this one).
``experts=2`` is Wan2.2-A14B's shape: a second transformer for the low-noise steps below ``boundary_ratio`` 0.875.
"""

from __future__ import annotations

import os
from pathlib import Path

from trainer.families.tiny_pipeline import SPEC, t5_tokenizer

WAN_SPEC = {
    **SPEC,
    "t5": {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4},
    "transformer": {
        "patch_size": [1, 2, 2],
        "num_attention_heads": 2,
        "attention_head_dim": 12,  # split 4 / 4 / 4 between frames, rows and columns by Wan's rotary embedding
        "ffn_dim": 48,
        "freq_dim": 16,
        "num_layers": 2,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
    },
    "vae": {"base_dim": 8, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 1},
    "scheduler": {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False},  # Wan's 480p flow_shift
    "boundary_ratio": 0.875,  # Wan2.2-A14B's (experts=2 only)
}


def tiny_wan_path(cache_dir: str | os.PathLike | None = None, experts: int = 1) -> Path:
    """The folder of the tiny Wan pipeline (with Wan2.2-A14B's second, low-noise transformer when ``experts`` is 2),
    building it first if it is not there yet."""
    from scorers.tiny_models import cached_build

    name, spec = ("tiny-wan", WAN_SPEC) if experts == 1 else ("tiny-wan22", {**WAN_SPEC, "experts": 2})
    return cached_build(name, spec, lambda folder: build_tiny_wan(experts).save_pretrained(folder), cache_dir)


def build_tiny_wan(experts: int = 1):
    """Random-init tiny WanPipeline; identical for identical WAN_SPEC and ``experts``."""
    import torch
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = t5_tokenizer(WAN_SPEC["vocabulary"])
    torch.manual_seed(WAN_SPEC["seed"] + 3)
    text = WAN_SPEC["t5"]
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1, **text))
    transformers = []
    for k in range(experts):
        torch.manual_seed(WAN_SPEC["seed"] + 4 + k)
        transformers.append(WanTransformer3DModel(text_dim=text["d_model"], **WAN_SPEC["transformer"]))
    torch.manual_seed(WAN_SPEC["seed"] + 1)
    vae = AutoencoderKLWan(**WAN_SPEC["vae"])
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(**WAN_SPEC["scheduler"]),
        transformer=transformers[0],
        transformer_2=transformers[1] if experts == 2 else None,
        boundary_ratio=WAN_SPEC["boundary_ratio"] if experts == 2 else None,
    )
