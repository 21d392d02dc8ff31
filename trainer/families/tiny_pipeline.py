"""An embedded tiny Stable Diffusion pipeline, built offline from a config and a seed.

The trainer loads every model through ``from_pretrained``; ``"tiny"`` only decides where that path comes
from. Building writes a complete diffusers pipeline folder (tokenizer, CLIP text encoder, UNet, an f8 VAE,
DDIM scheduler) so the code path a user runs with ``runwayml/stable-diffusion-v1-5`` is the one tested here.
The other tiny builders share its parts: ``SPEC``, ``tiny_vae``, ``clip_text_encoder``, ``tiny_t5``, and for
Qwen-style text encoders ``byte_level_bpe`` and ``QWEN3_CHAT_TEMPLATE``.
"""

from __future__ import annotations

import os
from pathlib import Path

# Words the tokenizer knows whole; anything else falls back to byte-level pieces, as CLIP's BPE does.
VOCABULARY = (
    "a an the of in on with and photo picture painting drawing image "
    "cat dog horse monkey rabbit zebra spider bird sheep deer cow goat lion tiger bear raccoon fox wolf "
    "lizard beetle ant butterfly fish shark whale dolphin elephant giraffe camel kangaroo panda koala owl "
    "washing dishes riding bike playing chess red blue green small big cute"
).split()

# Everything that shapes the weights goes into this dict: its hash names the cache folder.
SPEC = {
    "seed": 0,
    "resolution": 64,
    "text": {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4},
    "unet": {"block_out_channels": [32, 64], "layers_per_block": 1, "attention_head_dim": 8},
    "vae": {"block_out_channels": [8, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 8},
    "vocabulary": VOCABULARY,
}


def tiny_pipeline_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the folder of the tiny pipeline, building it first if it is not there yet."""
    from scorers.tiny_models import cached_build

    return cached_build("tiny-sd", SPEC, lambda folder: build_tiny_pipeline().save_pretrained(folder), cache_dir)


def build_tiny_pipeline():
    """Random-init tiny StableDiffusionPipeline, identical for identical SPEC."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from scorers.tiny_models import clip_tokenizer

    tokenizer = clip_tokenizer(SPEC["vocabulary"])

    torch.manual_seed(SPEC["seed"])
    text = SPEC["text"]
    text_encoder = clip_text_encoder(CLIPTextModel, text, tokenizer)
    unet = UNet2DConditionModel(
        sample_size=SPEC["resolution"] // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=text["hidden_size"],
        norm_num_groups=16,
        **SPEC["unet"],
    )
    vae = tiny_vae(AutoencoderKL, SPEC, in_channels=3, out_channels=3, latent_channels=4)
    return assemble_pipeline(text_encoder, tokenizer, unet, vae)


def clip_text_encoder(model_class, spec: dict, tokenizer):
    """A random-init CLIP text encoder (``CLIPTextModel`` or ``...WithProjection``) of ``spec``'s sizes, with the
    tokenizer's vocabulary and special tokens and CLIP's 77 positions."""
    from transformers import CLIPTextConfig

    return model_class(
        CLIPTextConfig(
            **spec,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


NO_QUANT_CONV = {"in_channels": 3, "out_channels": 3, "use_quant_conv": False, "use_post_quant_conv": False}


def tiny_vae(vae_class, spec: dict, **kwargs):
    """A random-init ``vae_class`` of ``spec["vae"]``'s sizes for ``spec["resolution"]`` px images: one plain
    encoder and one decoder block per width (``NO_QUANT_CONV``: without the quant convs, as the flow-matching
    pipelines' VAEs)."""
    blocks = spec["vae"]["block_out_channels"]
    return vae_class(
        down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks),
        sample_size=spec["resolution"],
        **kwargs,
        **spec["vae"],
    )


def assemble_pipeline(text_encoder, tokenizer, unet, vae):
    """A StableDiffusionPipeline of these parts with Stable Diffusion 1.x's DDIM schedule and no safety checker."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# SDXL's shape in miniature: two CLIP text encoders (the second with a projection, whose pooled output and
# the six micro-conditioning numbers feed the UNet's "text_time" embedding), the same VAE as above.
SDXL_SPEC = {**SPEC, "text_2": {**SPEC["text"], "projection_dim": 16}, "addition_time_embed_dim": 8}


def tiny_sdxl_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of the tiny SDXL pipeline, building it first if it is not there yet."""
    from scorers.tiny_models import cached_build

    return cached_build("tiny-sdxl", SDXL_SPEC, lambda folder: build_tiny_sdxl().save_pretrained(folder), cache_dir)


def build_tiny_sdxl():
    """Random-init tiny StableDiffusionXLPipeline, identical for identical SDXL_SPEC."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    from scorers.tiny_models import clip_tokenizer

    base = build_tiny_pipeline()  # its VAE and first text encoder, seeded as the SD1 tiny model
    tokenizer = clip_tokenizer(SDXL_SPEC["vocabulary"])
    torch.manual_seed(SDXL_SPEC["seed"] + 1)
    text_2 = clip_text_encoder(CLIPTextModelWithProjection, SDXL_SPEC["text_2"], tokenizer)
    time_dim = SDXL_SPEC["addition_time_embed_dim"]
    unet = UNet2DConditionModel(
        sample_size=SDXL_SPEC["resolution"] // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=SDXL_SPEC["text"]["hidden_size"] + SDXL_SPEC["text_2"]["hidden_size"],
        norm_num_groups=16,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=SDXL_SPEC["text_2"]["projection_dim"] + 6 * time_dim,
        **SDXL_SPEC["unet"],
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionXLPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        text_encoder_2=text_2,
        tokenizer=base.tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
    )


# SD3's shape in miniature: an MMDiT transformer on 16-channel latents, the two CLIP text encoders with
# projections (their pooled outputs concatenated), no T5 (optional in StableDiffusion3Pipeline: its tokens
# are zeros), a VAE with SD3's scaling and shift, and the flow-matching Euler scheduler with SD3's shift 3.
SD3_SPEC = {
    **SPEC,
    "text_2": {**SPEC["text"], "projection_dim": 16},
    "transformer": {
        "patch_size": 2,
        "num_layers": 2,
        "attention_head_dim": 8,
        "num_attention_heads": 4,
        "caption_projection_dim": 32,
        "pos_embed_max_size": 16,
    },
    "vae": {**SPEC["vae"], "latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609},
    "shift": 3.0,
}


# The same with a tiny T5 as text_encoder_3 (a word-level tokenizer of the same vocabulary); its width is the
# transformer's joint attention width, as in SD3.
SD3_T5_SPEC = {**SD3_SPEC, "t5": {"d_model": 64, "d_kv": 16, "d_ff": 64, "num_layers": 2, "num_heads": 4}}


def tiny_sd3_path(cache_dir: str | os.PathLike | None = None, t5: bool = False) -> Path:
    """The folder of the tiny SD3 pipeline (with a tiny T5 when ``t5``), building it first if it is not there yet."""
    from scorers.tiny_models import cached_build

    name, spec = ("tiny-sd3-t5", SD3_T5_SPEC) if t5 else ("tiny-sd3", SD3_SPEC)
    return cached_build(name, spec, lambda folder: build_tiny_sd3(t5).save_pretrained(folder), cache_dir)


def build_tiny_sd3(t5: bool = False):
    """Random-init tiny StableDiffusion3Pipeline, without T5 unless ``t5``; identical for identical specs (the
    parts they share are the same weights)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    from scorers.tiny_models import clip_tokenizer

    tokenizer = clip_tokenizer(SD3_SPEC["vocabulary"])
    torch.manual_seed(SD3_SPEC["seed"])
    encoders = [clip_text_encoder(CLIPTextModelWithProjection, SD3_SPEC["text_2"], tokenizer) for _ in range(2)]
    hidden, projection = SD3_SPEC["text_2"]["hidden_size"], SD3_SPEC["text_2"]["projection_dim"]
    transformer = SD3Transformer2DModel(
        sample_size=SD3_SPEC["resolution"] // 8,
        in_channels=16,
        out_channels=16,
        joint_attention_dim=2 * hidden,  # the CLIP pair's hidden states side by side (T5's width when present)
        pooled_projection_dim=2 * projection,
        **SD3_SPEC["transformer"],
    )
    vae = tiny_vae(AutoencoderKL, SD3_SPEC, **NO_QUANT_CONV)
    text_encoder_3 = tokenizer_3 = None
    if t5:
        text_encoder_3, tokenizer_3 = tiny_t5(SD3_T5_SPEC)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=SD3_SPEC["shift"]),
        vae=vae,
        text_encoder=encoders[0],
        tokenizer=tokenizer,
        text_encoder_2=encoders[1],
        tokenizer_2=tokenizer,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def tiny_t5(spec: dict):
    """A random-init T5 encoder and a word-level tokenizer of the vocabulary (no sentencepiece model needed)."""
    import torch
    from transformers import T5Config, T5EncoderModel

    tokenizer = t5_tokenizer(spec["vocabulary"])
    torch.manual_seed(spec["seed"] + 3)
    encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1, **spec["t5"]))
    return encoder, tokenizer


def t5_tokenizer(vocabulary: list[str]):
    """A word-level tokenizer of ``vocabulary`` with T5's pad (0), end (1) and unknown tokens, ending each text
    with </s> as T5's does (T5 and UMT5 alike: no sentencepiece model needed)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>", *dict.fromkeys(vocabulary)]
    tok = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])  # as T5's
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


# FLUX.1's shape in miniature: a FluxTransformer2DModel (double- and single-stream blocks, rotary ids) on 2x2-packed
# 16-channel latents, CLIP's pooled output and a tiny T5's tokens (32 of them: the tokenizer's model_max_length,
# which trainer/families/flux.py encodes), a VAE with FLUX.1's scaling and shift, and FLUX.1-dev's scheduler (shift by
# image size). ``guidance`` False is the schnell-like variant: no guidance input, schnell's fixed shift 1.
FLUX_SPEC = {
    **SPEC,
    "transformer": {
        "num_layers": 1,
        "num_single_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "axes_dims_rope": [4, 6, 6],
    },
    "t5": {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4},
    "t5_tokens": 32,
    "vae": {**SPEC["vae"], "latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159},
    "scheduler": {
        "use_dynamic_shifting": True,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
        "shift": 3.0,
    },
}


FLUX_SCHNELL_SPEC = {
    **FLUX_SPEC,
    "guidance": False,
    "scheduler": {**FLUX_SPEC["scheduler"], "use_dynamic_shifting": False, "shift": 1.0},
}


def tiny_flux_path(cache_dir: str | os.PathLike | None = None, guidance: bool = True) -> Path:
    """The folder of the tiny FLUX pipeline (schnell-like, no guidance input, unless ``guidance``), building it
    first if it is not there yet."""
    from scorers.tiny_models import cached_build

    name, spec = ("tiny-flux", FLUX_SPEC) if guidance else ("tiny-flux-schnell", FLUX_SCHNELL_SPEC)
    return cached_build(name, spec, lambda folder: build_tiny_flux(guidance).save_pretrained(folder), cache_dir)


def build_tiny_flux(guidance: bool = True):
    """Random-init tiny FluxPipeline; identical for identical FLUX_SPEC and ``guidance``."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    from scorers.tiny_models import clip_tokenizer

    tokenizer = clip_tokenizer(FLUX_SPEC["vocabulary"])
    torch.manual_seed(FLUX_SPEC["seed"])
    text_encoder = clip_text_encoder(CLIPTextModel, FLUX_SPEC["text"], tokenizer)  # FLUX takes its pooled output
    text_encoder_2, tokenizer_2 = tiny_t5(FLUX_SPEC)
    tokenizer_2.model_max_length = FLUX_SPEC["t5_tokens"]
    torch.manual_seed(FLUX_SPEC["seed"] + 4)
    transformer = FluxTransformer2DModel(
        in_channels=4 * FLUX_SPEC["vae"]["latent_channels"],
        joint_attention_dim=FLUX_SPEC["t5"]["d_model"],
        pooled_projection_dim=FLUX_SPEC["text"]["hidden_size"],
        guidance_embeds=guidance,
        **FLUX_SPEC["transformer"],
    )
    vae = tiny_vae(AutoencoderKL, FLUX_SPEC, **NO_QUANT_CONV)
    schedule = (FLUX_SPEC if guidance else FLUX_SCHNELL_SPEC)["scheduler"]
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**schedule),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


# -- the Qwen tokenizers' parts (the tiny text encoders of Qwen2/Qwen3 kind) ------------------------------------
QWEN3_CHAT_TEMPLATE = (  # Qwen3's template for what the pipelines send: user turns, the assistant's, thinking off
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def byte_level_bpe(words: list[str], special: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary and merges of a byte-level BPE (GPT-2's byte alphabet, Qwen2's kind) in which each of
    ``words``, alone or after a space ("Ġ"), can merge into one token: its letters left to right, then the space
    onto the whole word (BPE applies merges by rank, so a word another's chain splits first stays in pieces);
    ``special`` tokens last."""
    from scorers.tiny_models import byte_alphabet

    alphabet = byte_alphabet()
    merges = []
    for word in dict.fromkeys(words):
        symbols = list(word)
        while len(symbols) > 1:
            merges.append((symbols[0], symbols[1]))
            symbols = [symbols[0] + symbols[1], *symbols[2:]]
        merges.append((alphabet[ord(" ")], word))
    merges = list(dict.fromkeys(merges))
    tokens = [*alphabet, *(a + b for a, b in merges), *special]
    return {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}, merges
