"""Tiny random-init stand-ins for the scorers' networks, built offline and saved like real checkpoints.

``--checkpoint tiny`` (and the tests) load these through exactly the code that loads
openai/clip-vit-large-patch14 or llava-hf/llava-1.5-7b-hf: only the path differs. Each is built once per
spec into a cache folder named by the spec's hash, atomically, so concurrent processes agree.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

WORDS = (
    "a an the of in on with and is are this that what going image contains photo picture answer concisely "
    "cat dog horse monkey rabbit zebra bird sheep deer cow goat lion tiger bear fox wolf fish owl panda "
    "washing dishes riding bike playing chess red blue green small big cute yes no one two three four"
).split()


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir or os.environ.get("DIFFUSION_RL_CACHE", Path.home() / ".cache" / "diffusion-rl"))


def cached_build(name: str, spec: dict[str, Any], build: Callable[[Path], None], cache_dir=None) -> Path:
    """``cache/<name>-<hash of spec>``, running ``build(folder)`` into a staging folder first if missing.

    Whether the cache was warm must not change a seeded run, so building leaves torch's RNG as it found it.
    """
    root = cache_root(cache_dir)
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    path = root / f"{name}-{digest}"
    if not path.exists():  # a folder only ever appears here by an atomic rename of a finished build
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        import torch

        try:
            with torch.random.fork_rng(devices=[]):  # builders seed torch; the caller's stream must not move
                build(staging)
            try:
                staging.rename(path)
            except OSError:  # another process finished first; its copy is identical
                if not path.exists():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return path


def byte_alphabet() -> list[str]:
    """The 256 printable stand-ins GPT-2/CLIP byte-level BPE uses for the bytes 0..255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def clip_tokenizer(words: list[str], model_max_length: int = 77):
    """A CLIP-style BPE tokenizer in which each of ``words`` can merge into one token."""
    from transformers import CLIPTokenizer

    alphabet = byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            if pair not in merges:
                merges.append(pair)
                tokens.append(pair[0] + pair[1])
            symbols = [pair[0] + pair[1]] + symbols[2:]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        return CLIPTokenizer(
            str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=model_max_length
        )


# -- CLIP (aesthetic, clipscore, pickscore) -------------------------------------------------------------
CLIP_SPEC = {"seed": 1, "hidden": 32, "layers": 2, "heads": 4, "image_size": 32, "patch": 8, "projection": 16}


def build_clip(folder: Path, spec: dict = CLIP_SPEC) -> None:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = clip_tokenizer(WORDS)
    common = {
        "hidden_size": spec["hidden"],
        "intermediate_size": spec.get("intermediate", 2 * spec["hidden"]),
        "num_hidden_layers": spec["layers"],
        "num_attention_heads": spec["heads"],
    }
    config = CLIPConfig(
        text_config={
            **common,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={**common, "image_size": spec["image_size"], "patch_size": spec["patch"]},
        projection_dim=spec["projection"],
    )
    torch.manual_seed(spec["seed"])
    CLIPModel(config).save_pretrained(folder)
    size = spec["image_size"]
    images = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)


def build_aesthetic_mlp(file: Path, in_features: int, seed: int = 2) -> None:
    """Random weights in the LAION improved-aesthetic layout (keys layers.0/2/4/6/7)."""
    import torch
    from safetensors.torch import save_file

    from scorers.aesthetic_mlp import AestheticMLP

    torch.manual_seed(seed)
    save_file(AestheticMLP(in_features).state_dict(), str(file))


# -- LLaVA ------------------------------------------------------------------------------------------------
LLAVA_SPEC = {"seed": 3, "hidden": 32, "layers": 2, "heads": 4, "image_size": 8, "patch": 2}


def build_llava(folder: Path, spec: dict = LLAVA_SPEC) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        AddedToken,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(specials + WORDS + ["USER:", "ASSISTANT:", "?", ".", ","]))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="left",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [AddedToken("<image>", normalized=False, special=True)]})
    size, patch, hidden = spec["image_size"], spec["patch"], spec["hidden"]
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
    )
    layers = {
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": spec["layers"],
        "num_attention_heads": spec["heads"],
    }
    config = LlavaConfig(
        text_config=LlamaConfig(
            **layers,
            num_key_value_heads=spec["heads"],
            vocab_size=len(vocab),
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
        ),
        vision_config=CLIPVisionConfig(**layers, image_size=size, patch_size=patch),
        image_token_index=vocab["<image>"],
        image_seq_length=(size // patch) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(spec["seed"])
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)


# -- a BERT-like encoder for BERTScore --------------------------------------------------------------------
BERT_SPEC = {"seed": 4, "hidden": 32, "layers": 3, "heads": 4}


def build_bert(folder: Path, spec: dict = BERT_SPEC) -> None:
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    (folder / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(WORDS)]) + "\n"
    )
    tokenizer = BertTokenizer(str(folder / "vocab.txt"))
    torch.manual_seed(spec["seed"])
    BertModel(
        BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec["hidden"],
            num_hidden_layers=spec["layers"],
            num_attention_heads=spec["heads"],
            intermediate_size=2 * spec["hidden"],
        )
    ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# -- Mask2Former (GenEval's detector) ---------------------------------------------------------------------
MASK2FORMER_SPEC = {"seed": 5, "embed": 16, "hidden": 32, "queries": 6, "favoured": {"dog": 8.0, "cat": 6.5}}


def build_mask2former(folder: Path, spec: dict = MASK2FORMER_SPEC) -> None:
    """A random-init Mask2Former over the 80 COCO classes. Random class logits give every class about 1/81,
    below any threshold; the spec's favoured classes get their logit raised so that some detections pass
    GenEval's 0.3 (dog) and others not (cat), as a trained detector's would."""
    import torch
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig
    from transformers.models.mask2former.image_processing_pil_mask2former import Mask2FormerImageProcessorPil

    from scorers.geneval_rules import CLASSES

    e, hidden = spec["embed"], spec["hidden"]
    backbone = SwinConfig(
        embed_dim=e,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(
        backbone_config=backbone,
        feature_size=hidden,
        mask_feature_size=hidden,
        hidden_dim=hidden,
        encoder_feedforward_dim=2 * hidden,
        dim_feedforward=2 * hidden,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=4,
        num_queries=spec["queries"],
        id2label=dict(enumerate(CLASSES)),
        label2id={c: i for i, c in enumerate(CLASSES)},
        train_num_points=64,
    )
    torch.manual_seed(spec["seed"])
    model = Mask2FormerForUniversalSegmentation(config)
    with torch.no_grad():
        for name, logit in spec["favoured"].items():
            model.class_predictor.bias[CLASSES.index(name)] += logit
    model.save_pretrained(folder)
    Mask2FormerImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 128}).save_pretrained(folder)


# -- an OCR reader (TrOCR's layout: a ViT encoder, a text decoder) ---------------------------------------
OCR_SPEC = {"seed": 6, "hidden": 32, "layers": 2, "heads": 4, "image_size": 32, "patch": 8}
GOT_OCR_SPEC = {"seed": 7, "hidden": 32, "image_size": 256}


def build_ocr(folder: Path, spec: dict = OCR_SPEC) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        PreTrainedTokenizerFast,
        TrOCRConfig,
        TrOCRProcessor,
        ViTConfig,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
    )
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(specials + WORDS + ["open", "hello", "world", "sale"]))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    hidden, size = spec["hidden"], spec["image_size"]
    encoder = ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        intermediate_size=2 * hidden,
        image_size=size,
        patch_size=spec["patch"],
    )
    decoder = TrOCRConfig(
        vocab_size=len(vocab),
        d_model=hidden,
        decoder_layers=spec["layers"],
        decoder_attention_heads=spec["heads"],
        decoder_ffn_dim=2 * hidden,
        max_position_embeddings=64,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=0,
        tie_word_embeddings=False,
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 0, 1, 2
    torch.manual_seed(spec["seed"])
    model = VisionEncoderDecoderModel(config)
    with torch.no_grad():  # random weights would read "<s><s><s>...": silence the special tokens, so it reads words
        model.decoder.output_projection.weight[: len(specials)] = 0
    model.save_pretrained(folder)
    images = ViTImageProcessorPil(size={"height": size, "width": size})
    TrOCRProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)


def build_got_ocr(folder: Path, spec: dict = GOT_OCR_SPEC) -> None:
    """GOT-OCR2's layout (a SAM-style encoder whose 64 x 64 patches fold into the 256 image tokens its
    processor writes, a Qwen2 decoder), with a word-level tokenizer holding its chat and image tokens."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        AddedToken,
        GotOcr2Config,
        GotOcr2ForConditionalGeneration,
        GotOcr2Processor,
        PreTrainedTokenizerFast,
    )
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<imgpad>", "<unk>"]
    vocab = {
        tok: i for i, tok in enumerate(dict.fromkeys(specials + WORDS + ["open", "hello", "world", "sale", "OCR:"]))
    }
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, normalized=False, special=True) for t in specials[1:6]]}
    )
    hidden, size = spec["hidden"], spec["image_size"]
    config = GotOcr2Config(
        vision_config={
            "hidden_size": hidden // 2,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "mlp_dim": hidden,
            "image_size": size,
            "patch_size": size // 64,
            "window_size": 8,
            "global_attn_indexes": [1],
            "output_channels": hidden // 2,
        },
        text_config={
            "model_type": "qwen2",
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "vocab_size": len(vocab),
            "eos_token_id": vocab["<|im_end|>"],
            "pad_token_id": 0,
            "bos_token_id": 1,
        },
        image_token_index=vocab["<imgpad>"],
    )
    torch.manual_seed(spec["seed"])
    model = GotOcr2ForConditionalGeneration(config)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = vocab["<|im_end|>"], 0
    with torch.no_grad():  # as build_ocr: read words, not special tokens
        model.lm_head.weight[: len(specials)] = 0
    model.save_pretrained(folder)
    GotOcr2Processor(
        image_processor=GotOcr2ImageProcessorPil(size={"height": size, "width": size}), tokenizer=tokenizer
    ).save_pretrained(folder)


TINY = {
    "clip": (CLIP_SPEC, build_clip),
    "llava": (LLAVA_SPEC, build_llava),
    "bert": (BERT_SPEC, build_bert),
    "mask2former": (MASK2FORMER_SPEC, build_mask2former),
    "ocr": (OCR_SPEC, build_ocr),
    "got-ocr": (GOT_OCR_SPEC, build_got_ocr),
}


def tiny_checkpoint(kind: str, cache_dir=None) -> Path:
    spec, build = TINY[kind]
    return cached_build(f"tiny-{kind}", {**spec, "words": WORDS}, build, cache_dir)


# Trained, not random: the shapes world's CLIP (scorers/shapes_clip.py), shipped in the package.
SHIPPED = {("tiny-shapes", "clip"): Path(__file__).parent / "weights" / "tiny-shapes-clip"}


def resolve(checkpoint: str, kind: str) -> str:
    """A checkpoint option as a from_pretrained argument: 'tiny' becomes the built folder, 'tiny-shapes' the
    shipped one."""
    if (checkpoint, kind) in SHIPPED:
        return str(SHIPPED[checkpoint, kind])
    return str(tiny_checkpoint(kind)) if checkpoint == "tiny" else checkpoint
