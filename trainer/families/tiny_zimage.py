"""A tiny Z-Image pipeline (Tongyi-MAI/Z-Image; diffusers' ZImagePipeline), built offline from the real classes
with tiny configs and saved with ``save_pretrained``, as trainer/families/tiny_pipeline.py builds the others.

Z-Image's shape in miniature: a ZImageTransformer2DModel (single-stream blocks: noise and context refiners, then
the main layers over image and caption tokens together) on 16-channel latents, a Qwen3 text encoder (diffusers'
ZImagePipeline reads its second-to-last hidden states) with a byte-level BPE tokenizer of the Qwen2 kind and a
chat template in Qwen3's form, FLUX.1's VAE scaling and shift, and Z-Image-Turbo's scheduler (a fixed shift 3).
"""

from __future__ import annotations

import os
from pathlib import Path

from trainer.families.tiny_pipeline import NO_QUANT_CONV, QWEN3_CHAT_TEMPLATE, SPEC, byte_level_bpe, tiny_vae

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # Qwen's pad/end-of-text and chat-turn markers

ZIMAGE_SPEC = {
    **SPEC,
    "text": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,  # ZImagePipeline takes hidden_states[-2]: the first layer's output here
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
    },
    "tokens": 512,  # ZImagePipeline's default max_sequence_length
    "transformer": {
        "dim": 32,
        "n_layers": 2,
        "n_refiner_layers": 1,
        "n_heads": 2,
        "n_kv_heads": 2,
        "axes_dims": [4, 6, 6],  # sums to the head dim, as Z-Image's [32, 48, 48] to its 128
        "axes_lens": [1024, 64, 64],  # caption positions run to max_sequence_length + 1
    },
    "vae": {**SPEC["vae"], "latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159},
    "scheduler": {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False},  # Z-Image-Turbo's
}


def tiny_zimage_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of the tiny Z-Image pipeline, building it first if it is not there yet."""
    from scorers.tiny_models import cached_build

    return cached_build(
        "tiny-zimage", ZIMAGE_SPEC, lambda folder: build_tiny_zimage().save_pretrained(folder), cache_dir
    )


def qwen_tokenizer(words: list[str], model_max_length: int):
    """A Qwen2Tokenizer (byte-level BPE, GPT-2's byte alphabet) in which most of ``words``, alone or after a space
    (Qwen's "Ġ"), are one token (BPE's merge order splits a few; other words fall back to bytes); Qwen's special
    tokens and a chat template in Qwen3's form."""
    from transformers import Qwen2Tokenizer

    vocab, merges = byte_level_bpe(words, SPECIAL)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=model_max_length,
        additional_special_tokens=SPECIAL[1:],
    )
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE  # ZImagePipeline passes enable_thinking true: no think block
    return tokenizer


def build_tiny_zimage():
    """Random-init tiny ZImagePipeline, identical for identical ZIMAGE_SPEC."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    spec = ZIMAGE_SPEC
    tokenizer = qwen_tokenizer(spec["vocabulary"], spec["tokens"])
    torch.manual_seed(spec["seed"])
    text_encoder = Qwen3Model(
        Qwen3Config(
            vocab_size=len(tokenizer),
            max_position_embeddings=spec["tokens"],
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **spec["text"],
        )
    )
    torch.manual_seed(spec["seed"] + 5)
    transformer = ZImageTransformer2DModel(
        in_channels=spec["vae"]["latent_channels"], cap_feat_dim=spec["text"]["hidden_size"], **spec["transformer"]
    )
    _random_pad_tokens(transformer)
    vae = tiny_vae(AutoencoderKL, spec, **NO_QUANT_CONV)
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**spec["scheduler"]),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


def _random_pad_tokens(transformer) -> None:
    """ZImageTransformer2DModel initialises its pad tokens (x_pad_token, cap_pad_token: what fills each caption and
    image up to a multiple of 32 tokens) at zero; a trained model's are not, and nonzero ones let the tests see
    that the padding is the pipeline's. Small random values instead."""
    import torch

    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if p.abs().max() == 0:
                p.normal_(0.0, 0.02)
