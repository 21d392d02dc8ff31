"""ImageReward (Xu et al. 2023, "ImageReward: Learning and Evaluating Human Preferences for Text-to-Image
Generation"), the reward ReFL was introduced with: BLIP's ViT-L/16 image encoder, its BERT text encoder
attending to the image tokens, and an MLP on the [CLS] feature, standardised by the training set's mean and
std (a score of 0 is the average image; roughly -2 to 2).

Loaded from the published ``ImageReward.pt`` (a state dict in BLIP's names: ``blip.visual_encoder``,
``blip.text_encoder``, ``mlp.layers``) into transformers' BLIP modules, whose text encoder is a port of
BLIP's and keeps its parameter names; only the ViT's names differ (``vision_state``). The ``image-reward``
package is not needed (it pins timm 0.6). The tokenizer is BERT's (``bert-base-uncased``); the text
encoder's sizes are the published ``med_config.json``'s (``med_config`` to read another); the ViT's are
read from the weights (64-dimensional heads, as BLIP's ViT-B and ViT-L).
"""

from __future__ import annotations

import json

import numpy as np

from scorers.clip import resize_crop_normalise
from scorers.devices import half_on_gpu
from scorers.scorer import ScoreOutput, Scorer
from scorers.state_dict import load_state_dict

MEAN, STD = 0.16717362830052426, 1.0333394966054072  # the published model's reward statistics
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
MAX_TOKENS = 35
MED_CONFIG = {
    "vocab_size": 30524,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
}
_VIT = {
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def vision_state(state: dict) -> dict:
    """BLIP's ViT (timm's names) as transformers' BlipVisionModel."""
    out = {
        "embeddings.class_embedding": state["cls_token"],
        "embeddings.position_embedding": state["pos_embed"],
        "embeddings.patch_embedding.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embedding.bias": state["patch_embed.proj.bias"],
        "post_layernorm.weight": state["norm.weight"],
        "post_layernorm.bias": state["norm.bias"],
    }
    for key, value in state.items():
        if key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            module, _, param = rest.rpartition(".")
            out[f"encoder.layers.{index}.{_VIT[module]}.{param}"] = value
    return out


def _part(state: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def build(state: dict, med_config: dict):
    """The three parts of ImageReward, with the weights of ``state`` (the published file's names)."""
    from torch import nn
    from transformers import BlipTextConfig, BlipVisionConfig
    from transformers.models.blip.modeling_blip import BlipVisionModel
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    vit = vision_state(_part(state, "blip.visual_encoder."))
    width, _, patch, _ = vit["embeddings.patch_embedding.weight"].shape
    grid = int(round((vit["embeddings.position_embedding"].shape[1] - 1) ** 0.5))
    vision = BlipVisionModel(
        BlipVisionConfig(
            hidden_size=width,
            intermediate_size=vit["encoder.layers.0.mlp.fc1.weight"].shape[0],
            num_hidden_layers=1 + max(int(k.split(".")[2]) for k in vit if k.startswith("encoder.layers.")),
            num_attention_heads=width // 64,
            image_size=grid * patch,
            patch_size=patch,
            layer_norm_eps=1e-6,
        )
    )
    vision.load_state_dict(vit, strict=True)

    med = {**MED_CONFIG, **{k: v for k, v in med_config.items() if k in MED_CONFIG}}
    text = BlipTextModel(BlipTextConfig(**med, encoder_hidden_size=width), add_pooling_layer=False)
    wanted = text.state_dict().keys()  # the original also stores a position_ids buffer
    text.load_state_dict({k: v for k, v in _part(state, "blip.text_encoder.").items() if k in wanted}, strict=True)

    head = _part(state, "mlp.layers.")
    sizes = [head[f"{i}.weight"].shape for i in (0, 2, 4, 6, 7)]  # Linear layers between the dropouts
    mlp = nn.Sequential(
        nn.Linear(sizes[0][1], sizes[0][0]),
        nn.Dropout(0.2),
        nn.Linear(sizes[1][1], sizes[1][0]),
        nn.Dropout(0.2),
        nn.Linear(sizes[2][1], sizes[2][0]),
        nn.Dropout(0.1),
        nn.Linear(sizes[3][1], sizes[3][0]),
        nn.Linear(sizes[4][1], sizes[4][0]),
    )
    mlp.load_state_dict(head, strict=True)
    return vision.eval(), text.eval(), mlp.eval()


class ImageRewardScorer(Scorer):
    name = "imagereward"
    description = "ImageReward: BLIP-based human preference reward, standardised (0 = average image, about -2 to 2)"
    max_batch = 32

    def __init__(
        self, weights: str | None = None, checkpoint: str = "bert-base-uncased", med_config: str | None = None
    ):
        self.weights, self.tokenizer_id, self.med_config = weights, checkpoint, med_config

    def requirements(self) -> dict[str, tuple[str, str | None, str]]:
        needs = {
            "weights": ("file", self.weights, "ImageReward.pt"),
            "checkpoint": ("model", self.tokenizer_id, "the BERT tokenizer (bert-base-uncased)"),
        }
        if self.med_config is not None:
            needs["med_config"] = ("file", self.med_config, "med_config.json")
        return needs

    def load(self, device: str = "cpu") -> None:
        import torch
        from transformers import AutoTokenizer

        from scorers.tiny_models import resolve

        self.torch, self.device, self.dtype = torch, device, half_on_gpu(device)
        med = json.loads(open(self.med_config).read()) if self.med_config else {}
        vision, text, mlp = build(load_state_dict(self.weights), med)
        self.vision, self.text = vision.to(device, self.dtype), text.to(device, self.dtype)
        self.mlp = mlp.to(device)  # float32, as the original scores the float [CLS] feature
        self.tokenizer = AutoTokenizer.from_pretrained(resolve(self.tokenizer_id, "bert"))
        self.size = vision.config.image_size

    def score_tensor(self, images, prompts: list[str], metadata=None):
        """Differentiable rewards (N,) of float images (N, 3, H, W) in [0, 1]: the original's resize to 224
        (bicubic), centre crop and CLIP normalisation, in torch."""
        pixels = resize_crop_normalise(images.to(self.device), self.size, (self.size, self.size), CLIP_MEAN, CLIP_STD)
        image_tokens = self.vision(pixel_values=pixels.to(self.dtype)).last_hidden_state
        text = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
        ).to(self.device)
        ones = self.torch.ones(image_tokens.shape[:-1], dtype=self.torch.long, device=self.device)
        hidden = self.text(
            input_ids=text["input_ids"],
            attention_mask=text["attention_mask"],
            encoder_hidden_states=image_tokens,
            encoder_attention_mask=ones,
        ).last_hidden_state
        return ((self.mlp(hidden[:, 0].float()) - MEAN) / STD).squeeze(-1)

    def score(self, images, prompts, metadata) -> ScoreOutput:
        with self.torch.inference_mode():
            pixels = self.torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255)
            return ScoreOutput(self.score_tensor(pixels, prompts).double().cpu().numpy())
