"""CLIP-based scores: CLIP score (100 x cosine, floored at 0) and PickScore (logit scale x cosine).

``ClipEmbedder`` loads a transformers CLIPModel and its processor once and embeds images and prompts; the
aesthetic scorer uses it too. Each scorer has two entries into one implementation: ``score`` on uint8
images (the processor's PIL resize), and ``score_tensor`` on float images in [0, 1] with the same resize,
crop and normalisation in torch, differentiable, for rewards whose gradient trains the model (ReFL).
"""

from __future__ import annotations

import numpy as np

from scorers.devices import dtype_kwarg, half_on_gpu
from scorers.scorer import CHANNELS_LAST, ScoreOutput, Scorer, central
from scorers.tiny_models import resolve


def features(output):
    """transformers 5 returns an output object from get_*_features; older versions return the tensor."""
    return output if hasattr(output, "norm") else output.pooler_output


def _get(size, key: str) -> int:
    """A processor size entry: transformers 5's SizeDict or older versions' plain dict."""
    return size[key] if isinstance(size, dict) else getattr(size, key)


def resize_crop_normalise(images, short: int, crop: tuple[int, int], mean, std):
    """CLIP's preprocessing of (N, 3, H, W) float images in [0, 1], differentiable: the shorter side resized
    to ``short`` (bicubic, antialiased, as PIL), the centre ``crop`` (height, width), then mean and std."""
    import torch
    import torch.nn.functional as F

    images = central(images, -2, -1)
    h, w = images.shape[-2:]
    scale = short / min(h, w)
    x = F.interpolate(
        images,
        size=(max(short, round(h * scale)), max(short, round(w * scale))),
        mode="bicubic",
        antialias=True,
        align_corners=False,
    )
    top, left = (x.shape[-2] - crop[0]) // 2, (x.shape[-1] - crop[1]) // 2
    x = x[..., top : top + crop[0], left : left + crop[1]]
    mean, std = (torch.tensor(v, device=x.device, dtype=x.dtype).view(1, -1, 1, 1) for v in (mean, std))
    return (x - mean) / std


class ClipEmbedder:
    def __init__(self, checkpoint: str, processor: str | None = None):
        self.checkpoint, self.processor_id = checkpoint, processor or checkpoint

    def requirements(self) -> dict[str, tuple[str, str | None, str]]:
        needs = {"checkpoint": ("model", self.checkpoint, "the CLIP model")}
        if self.processor_id != self.checkpoint:
            needs["processor"] = ("model", self.processor_id, "the CLIP processor")
        return needs

    def load(self, device: str, weights: dict | None = None) -> None:
        """``weights``: a CLIPModel state dict that replaces the checkpoint's (HPSv2), which then gives only
        the architecture and the processor."""
        import torch
        from transformers import AutoProcessor, CLIPConfig, CLIPModel

        self.torch, self.device, self.dtype = torch, device, half_on_gpu(device)
        if weights is None:
            model = CLIPModel.from_pretrained(resolve(self.checkpoint, "clip"), **dtype_kwarg(self.dtype))
        else:
            from accelerate import init_empty_weights

            with init_empty_weights(include_buffers=False):  # no memory for weights about to be replaced
                model = CLIPModel(CLIPConfig.from_pretrained(resolve(self.checkpoint, "clip")))
            model.load_state_dict(weights, strict=True, assign=True)
        self.model = model.to(device, self.dtype).eval()
        self.processor = AutoProcessor.from_pretrained(resolve(self.processor_id, "clip"))

    def images(self, images: np.ndarray):
        """L2-normalised image embeddings, float32 (N, D)."""
        with self.torch.inference_mode():
            images = [central(image) for image in images]
            pixels = self.processor(images=images, return_tensors="pt", **CHANNELS_LAST)["pixel_values"]
            return self.embed(pixels)

    def pixels(self, images):
        """The processor's preprocessing of (N, 3, H, W) float images in [0, 1], in torch and differentiable."""
        proc = getattr(self.processor, "image_processor", self.processor)
        crop = tuple(_get(proc.crop_size, k) for k in ("height", "width"))
        return resize_crop_normalise(
            images.to(self.device), _get(proc.size, "shortest_edge"), crop, proc.image_mean, proc.image_std
        )

    def embed(self, pixel_values):
        """L2-normalised embeddings of preprocessed pixels, float32 (with the gradient, outside inference mode)."""
        emb = features(self.model.get_image_features(pixel_values=pixel_values.to(self.device, self.dtype))).float()
        return emb / emb.norm(dim=-1, keepdim=True)

    def texts(self, prompts: list[str]):
        # no_grad, not inference mode: the embeddings meet differentiable image embeddings in score_tensor
        with self.torch.no_grad():
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

    def head(self, cosine):
        """The score of a cosine (numpy or torch)."""
        return 100 * cosine.clip(min=0)

    def score(self, images, prompts, metadata) -> ScoreOutput:
        cosine = self.cosine(images, prompts)
        return ScoreOutput(self.head(cosine), {"cosine": cosine.tolist()})

    def score_tensor(self, images, prompts: list[str], metadata=None):
        """Differentiable scores (N,) of float images (N, 3, H, W) in [0, 1]."""
        return self.head((self.clip.embed(self.clip.pixels(images)) * self.clip.texts(prompts)).sum(-1))


class PickScore(ClipScore):
    name = "pickscore"
    description = "PickScore: logit_scale.exp() x cosine(image, prompt), about 20-23 for typical images"

    def __init__(
        self,
        checkpoint: str = "yuvalkirstain/PickScore_v1",
        processor: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    ):
        super().__init__(checkpoint, processor if checkpoint not in ("tiny", "tiny-shapes") else None)

    def head(self, cosine):
        return float(self.clip.model.logit_scale.detach().float().exp()) * cosine
