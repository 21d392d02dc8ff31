"""CLIP-based scores: CLIP score (100 x cosine, floored at 0) and PickScore (logit scale x cosine).

``ClipEmbedder`` loads a transformers CLIPModel and its processor once and embeds images and prompts; the
aesthetic scorer uses it too.
"""

from __future__ import annotations

import numpy as np

from reward_servers.devices import dtype_kwarg, half_on_gpu
from reward_servers.scorer import ScoreOutput, Scorer
from reward_servers.tiny_models import resolve


def features(output):
    """transformers 5 returns an output object from get_*_features; older versions return the tensor."""
    return output if hasattr(output, "norm") else output.pooler_output


class ClipEmbedder:
    def __init__(self, checkpoint: str, processor: str | None = None):
        self.checkpoint, self.processor_id = checkpoint, processor or checkpoint

    def requirements(self) -> dict[str, tuple[str, str | None, str]]:
        needs = {"checkpoint": ("model", self.checkpoint, "the CLIP model")}
        if self.processor_id != self.checkpoint:
            needs["processor"] = ("model", self.processor_id, "the CLIP processor")
        return needs

    def load(self, device: str) -> None:
        import torch
        from transformers import AutoProcessor, CLIPModel

        self.torch, self.device, self.dtype = torch, device, half_on_gpu(device)
        self.model = CLIPModel.from_pretrained(resolve(self.checkpoint, "clip"), **dtype_kwarg(self.dtype)).to(device).eval()
        self.processor = AutoProcessor.from_pretrained(resolve(self.processor_id, "clip"))

    def images(self, images: np.ndarray):
        """L2-normalised image embeddings, float32 (N, D)."""
        with self.torch.inference_mode():
            pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
            emb = features(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))).float()
        return emb / emb.norm(dim=-1, keepdim=True)

    def texts(self, prompts: list[str]):
        with self.torch.inference_mode():
            tokens = self.processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
            emb = features(self.model.get_text_features(**{k: v.to(self.device) for k, v in tokens.items()})).float()
        return emb / emb.norm(dim=-1, keepdim=True)


class ClipScore(Scorer):
    name = "clipscore"
    description = "CLIP score: 100 x cosine(image, prompt), floored at 0 (torchmetrics' convention)"

    def __init__(self, checkpoint: str = "openai/clip-vit-large-patch14", processor: str | None = None):
        self.clip = ClipEmbedder(checkpoint, processor)

    def requirements(self) -> dict[str, tuple[str, str | None, str]]:
        return self.clip.requirements()

    def load(self, device: str = "cpu") -> None:
        self.clip.load(device)

    def cosine(self, images, prompts) -> np.ndarray:
        return (self.clip.images(images) * self.clip.texts(prompts)).sum(-1).cpu().double().numpy()

    def score(self, images, prompts, metadata) -> ScoreOutput:
        cosine = self.cosine(images, prompts)
        return ScoreOutput(np.maximum(100 * cosine, 0), {"cosine": cosine.tolist()})


class PickScore(ClipScore):
    name = "pickscore"
    description = "PickScore: logit_scale.exp() x cosine(image, prompt), about 20-23 for typical images"

    def __init__(
        self,
        checkpoint: str = "yuvalkirstain/PickScore_v1",
        processor: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    ):
        super().__init__(checkpoint, processor if checkpoint not in ("tiny", "tiny-shapes") else None)

    def score(self, images, prompts, metadata) -> ScoreOutput:
        cosine = self.cosine(images, prompts)
        scale = float(self.clip.model.logit_scale.detach().float().exp())
        return ScoreOutput(scale * cosine, {"cosine": cosine.tolist()})
