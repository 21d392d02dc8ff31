"""FLUX.2 [klein]'s shape in miniature (diffusers' Flux2KleinPipeline), built offline from the real classes with
tiny configs and saved with ``save_pretrained``, as trainer/families/tiny_pipeline.py builds the other families.

What the pipeline takes, and the miniature of each:

- a Qwen3ForCausalLM text encoder whose hidden states 9, 18 and 27 (the pipeline's ``text_encoder_out_layers``)
  are stacked into the prompt tokens: 28 tiny layers, so that those three are inner layers as in Qwen3-4B's 36
  and the family encodes with the pipeline's own defaults;
- a Qwen2 byte-level BPE tokenizer with Qwen3's chat template (the pipeline wraps each prompt in a user turn and
  an assistant turn with thinking disabled): the vocabulary's words merge whole, anything else falls back to
  bytes, and the template's markers are special tokens; 32 tokens (``model_max_length``), which the family
  encodes (the pipeline's default is 512);
- a Flux2Transformer2DModel (double- and single-stream blocks, 4-axis rotary ids) on 2x2-patchified latents;
- an AutoencoderKLFlux2 whose batch-norm statistics (the pipeline's latent normalisation) are set to non-trivial
  values, as a trained VAE's are, so that the normalisation is exercised;
- FLUX.2's scheduler config (shift by image size: the pipeline passes its own ``compute_empirical_mu``).

``distilled`` True is FLUX.2-klein-4B-like (``is_distilled``: 4-step sampling, no classifier-free guidance),
False the base model (real CFG: a second, negative-prompt pass).
"""

from __future__ import annotations

import os
from pathlib import Path

from trainer.families.tiny_pipeline import FLUX_SPEC, QWEN3_CHAT_TEMPLATE, SPEC, byte_level_bpe, tiny_vae

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

FLUX2_SPEC = {
    "seed": SPEC["seed"],
    "resolution": 64,
    "vocabulary": [*SPEC["vocabulary"], "user", "assistant"],
    "tokens": 32,
    "qwen3": {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 28,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 8,
        "max_position_embeddings": 64,
    },
    "out_layers": [9, 18, 27],  # Flux2KleinPipeline's default text_encoder_out_layers
    "transformer": {
        "num_layers": 1,
        "num_single_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "timestep_guidance_channels": 32,
        "axes_dims_rope": [4, 4, 4, 4],
    },
    "vae": {**SPEC["vae"], "latent_channels": 8},
    "scheduler": {**FLUX_SPEC["scheduler"], "time_shift_type": "exponential"},  # FLUX.1-dev's, the time shift stated
}


def tiny_flux2_path(cache_dir: str | os.PathLike | None = None, distilled: bool = True) -> Path:
    """The folder of the tiny FLUX.2 [klein] pipeline (the guidance-distilled 4-step model, or the base model
    with real CFG unless ``distilled``), building it first if it is not there yet."""
    from scorers.tiny_models import cached_build

    name = "tiny-flux2" if distilled else "tiny-flux2-base"
    spec = {**FLUX2_SPEC, "distilled": distilled}
    return cached_build(name, spec, lambda folder: build_tiny_flux2(distilled).save_pretrained(folder), cache_dir)


def qwen_tokenizer(words: list[str], model_max_length: int):
    """A Qwen2 byte-level BPE tokenizer (Qwen2TokenizerFast, the class the pipeline names) in which each of
    ``words``, alone or after a space, is one token, with Qwen3's special tokens and chat template."""
    from transformers import Qwen2TokenizerFast

    vocab, merges = byte_level_bpe(words, SPECIAL)
    tokenizer = Qwen2TokenizerFast(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=model_max_length,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL[1:]})
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


def build_tiny_flux2(distilled: bool = True):
    """Random-init tiny Flux2KleinPipeline; identical for identical FLUX2_SPEC and ``distilled``."""
    import torch
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    spec = FLUX2_SPEC
    tokenizer = qwen_tokenizer(spec["vocabulary"], spec["tokens"])
    torch.manual_seed(spec["seed"])
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **spec["qwen3"],
        )
    )
    latent_channels = spec["vae"]["latent_channels"]
    transformer = Flux2Transformer2DModel(
        in_channels=4 * latent_channels,  # 2x2 patches of the VAE's latents
        joint_attention_dim=len(spec["out_layers"]) * spec["qwen3"]["hidden_size"],  # three layers side by side
        guidance_embeds=False,  # klein has no guidance input, distilled or not
        **spec["transformer"],
    )
    vae = tiny_vae(AutoencoderKLFlux2, spec)
    with torch.no_grad():  # a trained VAE's running statistics of its patchified latents, not BatchNorm's 0 and 1
        vae.bn.running_mean.copy_(0.2 * torch.randn(4 * latent_channels))
        vae.bn.running_var.copy_(torch.rand(4 * latent_channels) * 1.5 + 0.5)
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**spec["scheduler"]),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=distilled,
    )
