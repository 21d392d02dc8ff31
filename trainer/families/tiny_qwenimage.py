"""Qwen-Image's shape in miniature (Qwen/Qwen-Image; diffusers' QwenImagePipeline), built offline from the real
classes with tiny configs and saved with ``save_pretrained``, as trainer/families/tiny_pipeline.py builds the others:

- ``QwenImageTransformer2DModel``: 2 double-stream blocks on 2x2-packed 16-channel latents (64 channels a
  token), 2 heads of 16, rotary axes (4, 6, 6) summing to the head width as Qwen-Image's (16, 56, 56) do to 128;
- ``Qwen2_5_VLForConditionalGeneration`` with a tiny ``Qwen2_5_VLConfig`` (vision tower included, 1 block),
  its multimodal rotary sections summing to half the head width as the 7B's (16, 24, 24) do to 64;
- a byte-level BPE ``Qwen2Tokenizer`` (no hub): the byte alphabet, every word of the pipeline's system template
  and of the tiny vocabulary merged whole, with and without Qwen's leading-space marker, and the chat tokens.
  The pipeline drops the template's first 34 tokens (``prompt_template_encode_start_idx``), counted with
  Qwen's tokenizer: this one splits the template into the same 34, so what is dropped is the system part, as
  with the real model;
- ``AutoencoderKLQwenImage``: the video-style VAE (frame axis of 1, x8, 16 channels, its published per-channel
  ``latents_mean``/``latents_std``, the defaults) at base width 8;
- ``FlowMatchEulerDiscreteScheduler`` with Qwen-Image's published scheduler config (dynamic shift by image
  tokens, exponential time shift, shift_terminal 0.02), so the shifting code path runs.
"""

from __future__ import annotations

import os
from pathlib import Path

from trainer.families.tiny_pipeline import SPEC

# Qwen/Qwen-Image scheduler/scheduler_config.json (as published)
QWEN_SCHEDULER = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}

# QwenImagePipeline.prompt_template_encode, whose words the tokenizer knows whole
TEMPLATE_WORDS = (
    "system user assistant Describe the image by detailing color shape size texture quantity text spatial "
    "relationships of objects and background"
).split()
CHAT_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # Qwen2's pad/eos and chat markers

QWENIMAGE_SPEC = {
    **SPEC,
    "text": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "mrope_section": [1, 1, 2],
    },
    "vision": {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 32},
    "transformer": {"num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2, "axes_dims_rope": [4, 6, 6]},
    "vae": {"base_dim": 8, "z_dim": 16, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1},
    "template_words": TEMPLATE_WORDS,
    "scheduler": QWEN_SCHEDULER,
}


def tiny_qwenimage_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of the tiny Qwen-Image pipeline, building it first if it is not there yet."""
    from scorers.tiny_models import cached_build

    return cached_build(
        "tiny-qwenimage", QWENIMAGE_SPEC, lambda folder: build_tiny_qwenimage().save_pretrained(folder), cache_dir
    )


def qwen_tokenizer(words: list[str]):
    """A byte-level BPE Qwen2Tokenizer in which each of ``words`` (and " word") is one token, every other text
    falling back to byte pieces as Qwen's does; <|endoftext|> pads, as in Qwen2.5-VL. The merges are learnt
    (tokenizers' BpeTrainer on the words, through Qwen2's own pre-tokenizer) rather than written word by word:
    BPE applies merges by rank, so hand-written chains of one word block another's ("the" inside " the")."""
    import json

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import AddedToken, Qwen2Tokenizer

    learner = Tokenizer(models.BPE())
    qwen = Qwen2Tokenizer()._tokenizer  # Qwen2's normalizer and pre-tokenizer (its regex split, byte-level)
    learner.normalizer, learner.pre_tokenizer = normalizers.NFC(), qwen.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=1 << 20,  # until every word is whole
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=CHAT_TOKENS,
        show_progress=False,
    )
    learner.train_from_iterator([w for word in dict.fromkeys(words) for w in (word, " " + word)], trainer)
    model = json.loads(learner.to_str())["model"]
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]])
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, normalized=False, special=True) for t in CHAT_TOKENS[1:]]}
    )
    return tokenizer


def build_tiny_qwenimage():
    """Random-init tiny QwenImagePipeline, identical for identical QWENIMAGE_SPEC."""
    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    spec = QWENIMAGE_SPEC
    tokenizer = qwen_tokenizer(spec["template_words"] + spec["vocabulary"])
    text = dict(spec["text"])
    mrope = text.pop("mrope_section")
    ids = tokenizer.convert_tokens_to_ids(CHAT_TOKENS)
    config = Qwen2_5_VLConfig(
        text_config={
            **text,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 2048,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope},
            "bos_token_id": ids[0],
            "eos_token_id": ids[2],
            "pad_token_id": ids[0],
        },
        vision_config={**spec["vision"], "fullatt_block_indexes": [0]},
        # the image/video tokens Qwen2.5-VL reserves: out of the tiny vocabulary's way (never in a prompt)
        image_token_id=len(tokenizer),
        video_token_id=len(tokenizer) + 1,
        vision_start_token_id=len(tokenizer) + 2,
        vision_end_token_id=len(tokenizer) + 3,
    )
    torch.manual_seed(spec["seed"])
    text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    torch.manual_seed(spec["seed"] + 5)
    transformer = QwenImageTransformer2DModel(
        in_channels=4 * spec["vae"]["z_dim"],
        out_channels=spec["vae"]["z_dim"],
        joint_attention_dim=spec["text"]["hidden_size"],
        **spec["transformer"],
    )
    vae = AutoencoderKLQwenImage(**spec["vae"])
    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**spec["scheduler"]),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
