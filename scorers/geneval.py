"""GenEval (Ghosh et al. 2023) as a reward: transformers' Mask2Former finds the objects, CLIP names their
colours, and GenEval's rules (scorers/geneval_rules.py) check the prompt's requirements.

GenEval runs mmdet's Mask2Former (Swin-S, COCO instance segmentation); here it is transformers'
``Mask2FormerForUniversalSegmentation`` (default ``facebook/mask2former-swin-small-coco-instance``, the same
architecture trained by Mask2Former's authors, not mmdet's checkpoint) with mmdet's test-time handling
written out: the image resized to mmdet's test scale (shorter side 800, longer at most 1333), each query's
mask upsampled to the input and back to the image, the best 100 (query, class) pairs scored as class
probability x mean mask probability inside the mask, boxes the masks' extents. Colour is CLIP zero-shot over
GenEval's colour names with its three templates, on each object's crop with everything outside its mask
filled #999 (GenEval uses open_clip's ViT-L-14 "openai" weights: ``openai/clip-vit-large-patch14`` here).

The score is Flow-GRPO's fraction of satisfied requirements (training), or with ``strict=true`` GenEval's
correctness, 1 or 0 (evaluation: the benchmark is the mean over its six tags). ``info`` has both
(``fraction``, ``correct``), the tag (``category``), what was detected and why the image is not correct.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from scorers import geneval_rules as rules
from scorers.devices import dtype_kwarg, half_on_gpu
from scorers.scorer import ScoreOutput, Scorer
from scorers.tiny_models import resolve

TEMPLATES = ("a photo of a {c} {name}", "a photo of a {c}-colored {name}", "a photo of a {c} object")
BACKGROUND = 0x99  # GenEval's bgcolor "#999"
MAX_PER_IMAGE = 100  # mmdet's Mask2Former test_cfg max_per_image


def _flag(value: Any, name: str) -> bool:
    """--options values arrive as strings."""
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    if str(value).lower() in ("true", "1", "yes", "false", "0", "no"):
        return str(value).lower() in ("true", "1", "yes")
    raise ValueError(f"--options {name}: expected true or false, got {value!r}")


class GenEvalScorer(Scorer):
    name = "geneval"
    description = (
        "GenEval: fraction of the prompt's requirements (objects, counts, colours, positions) met, as "
        "Flow-GRPO trains on; strict=true: GenEval's correctness, 1 or 0"
    )
    max_batch = 16

    def __init__(
        self,
        checkpoint: str = "facebook/mask2former-swin-small-coco-instance",
        clip: str | None = None,
        strict: bool | str = False,
        fraction: str = "parts",
        threshold: float = 0.3,
        counting_threshold: float = 0.9,
        max_objects: int = 16,
        max_overlap: float = 1.0,
        position_threshold: float = 0.1,
        resize: int = 800,
        max_size: int = 1333,
    ):
        self.checkpoint = checkpoint
        self.clip_checkpoint = clip or ("tiny" if checkpoint == "tiny" else "openai/clip-vit-large-patch14")
        self.strict = _flag(strict, "strict")
        if fraction not in ("parts", "flow_grpo"):
            raise ValueError(f"--options fraction: expected parts or flow_grpo, got {fraction!r}")
        # parts: each requirement part counted once; flow_grpo: as Flow-GRPO's and DiffusionNFT's gen_eval.py,
        # which score a failed position 1/4 higher (geneval_rules.fraction says where they differ)
        self.fraction = fraction
        self.options = {
            "threshold": float(threshold),
            "counting_threshold": float(counting_threshold),
            "max_objects": int(max_objects),
            "max_overlap": float(max_overlap),
            "position_threshold": float(position_threshold),
        }
        self.resize, self.max_size = int(resize), int(max_size)

    def requirements(self) -> dict[str, tuple[str, str | None, str]]:
        return {
            "checkpoint": ("model", self.checkpoint, "the Mask2Former detector"),
            "clip": ("model", self.clip_checkpoint, "the CLIP model for colours"),
        }

    def load(self, device: str = "cpu") -> None:
        import torch
        from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

        from scorers.clip import ClipEmbedder

        path = resolve(self.checkpoint, "mask2former")
        self.torch, self.device, self.dtype = torch, device, half_on_gpu(device)
        self.detector = (
            Mask2FormerForUniversalSegmentation.from_pretrained(path, **dtype_kwarg(self.dtype)).to(device).eval()
        )
        processor = AutoImageProcessor.from_pretrained(path)
        self.mean, self.std = (
            torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (processor.image_mean, processor.image_std)
        )
        labels = self.detector.config.id2label
        # COCO-instance checkpoints list the 80 classes in COCO's order under their own spellings ("tv",
        # "mouse", ...); GenEval's names are the same classes in the same order.
        self.classes = (
            list(rules.CLASSES) if len(labels) == len(rules.CLASSES) else [labels[i] for i in range(len(labels))]
        )
        self.clip = ClipEmbedder(self.clip_checkpoint)
        self.clip.load(device)
        self.color_classifiers: dict[str, Any] = {}

    def check(self, prompts, metadata) -> None:
        for i, (prompt, meta) in enumerate(zip(prompts, metadata)):
            _metadata(i, prompt, meta)

    def detect(self, images: np.ndarray) -> list[list[rules.Detection]]:
        """Every image's (query, class) detections as mmdet's Mask2Former instance head reports them."""
        torch, F = self.torch, self.torch.nn.functional
        n, h, w = images.shape[:3]
        scale = min(self.resize / min(h, w), self.max_size / max(h, w))
        # at least one pixel a side: a 1x3000 image scales its short side to 0.44 px (PyTorch refuses size 0)
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2).float() / 255
        x = (F.interpolate(x, size=size, mode="bilinear", align_corners=False) - self.mean) / self.std
        pad = [(-s) % 32 for s in size]  # mmdet pads to a multiple of 32 at the bottom and right
        x = F.pad(x, (0, pad[1], 0, pad[0]))
        with torch.inference_mode():
            out = self.detector(pixel_values=x.to(self.dtype))
        found = []
        for classes, masks in zip(out.class_queries_logits.float(), out.masks_queries_logits.float()):
            masks = F.interpolate(masks[None], size=x.shape[-2:], mode="bilinear", align_corners=False)
            masks = F.interpolate(masks[:, :, : size[0], : size[1]], size=(h, w), mode="bilinear", align_corners=False)[
                0
            ]
            probs = classes.softmax(-1)[:, :-1]
            scores, index = probs.flatten().topk(min(MAX_PER_IMAGE, probs.numel()))
            query, label = index // probs.shape[1], index % probs.shape[1]
            binary = masks[query] > 0
            mask_scores = (masks[query].sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
            found.append(
                [
                    {"class": self.classes[int(c)], "score": float(s), "mask": m}
                    for c, s, m in zip(label, scores * mask_scores, binary)
                ]
            )
        return found

    def kept(self, detections: list[rules.Detection], tag: str) -> dict[str, list[rules.Detection]]:
        """GenEval's selection; masks become numpy and boxes their extents (mmdet's mask2bbox) only for the
        detections kept."""
        low = self.options["counting_threshold"] if tag == "counting" else self.options["threshold"]
        candidates = [d for d in detections if d["score"] > low]
        for d in candidates:
            d["mask"] = d["mask"].cpu().numpy()
            ys, xs = np.nonzero(d["mask"])
            d["box"] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) if len(xs) else (0, 0, 0, 0)
        return rules.select(candidates, tag, self.options)

    def colors(self, image: np.ndarray, name: str, objects: list[rules.Detection]) -> list[str]:
        """Each object's colour: CLIP's nearest of GenEval's colour classifiers on its masked crop."""
        todo = [o for o in objects if "color" not in o]
        if todo:
            crops = []
            for o in todo:
                x0, y0, x1, y1 = (int(v) for v in o["box"])
                masked = np.where(o["mask"][..., None], image, np.uint8(BACKGROUND))
                crops.append(masked[y0 : max(y1, y0 + 1), x0 : max(x1, x0 + 1)])
            logits = self.clip.images(crops) @ self.classifier(name).T
            for o, k in zip(todo, logits.argmax(-1).tolist()):
                o["color"] = rules.COLORS[k]
        return [o["color"] for o in objects]

    def classifier(self, name: str):
        """GenEval's zero-shot colour classifier for a class (clip_benchmark's zero_shot_classifier): each
        colour's templates embedded, normalised, averaged and normalised again."""
        if name not in self.color_classifiers:
            texts = [t.format(c=c, name=name) for c in rules.COLORS for t in TEMPLATES]
            emb = self.clip.texts(texts).view(len(rules.COLORS), len(TEMPLATES), -1).mean(1)
            self.color_classifiers[name] = emb / emb.norm(dim=-1, keepdim=True)
        return self.color_classifiers[name]

    def score(self, images, prompts, metadata) -> ScoreOutput:
        wanted = [_metadata(i, p, m) for i, (p, m) in enumerate(zip(prompts, metadata))]
        # "category": GenEval's tag, under the name the trainer breaks accuracy down by (as the shapes verifier's)
        info: dict[str, list] = {"correct": [], "fraction": [], "category": [], "failed": [], "detected": []}
        for image, meta, detections in zip(images, wanted, self.detect(images)):
            objects = self.kept(detections, meta["tag"])
            colors_of = lambda name, objs, image=image: self.colors(image, name, objs)  # noqa: E731
            correct, failed = rules.evaluate(objects, meta, colors_of, self.options["position_threshold"])
            info["correct"].append(correct)
            info["fraction"].append(
                rules.fraction(objects, meta, colors_of, self.options["position_threshold"], self.fraction)
            )
            info["category"].append(meta["tag"])
            info["failed"].append(failed)
            info["detected"].append(
                [
                    f"{o['class']} {o['score']:.2f} at {tuple(int(v) for v in o['box'])}"
                    + (f" {o['color']}" if "color" in o else "")
                    for objs in objects.values()
                    for o in objs
                ]
            )
        scores = [float(c) for c in info["correct"]] if self.strict else info["fraction"]
        return ScoreOutput(np.array(scores, dtype=np.float64), info)


def _metadata(i: int, prompt: str, meta: dict[str, Any] | None) -> dict[str, Any]:
    """Image i's GenEval metadata: its own (``tag``/``include``/``exclude`` at the top level, as GenEval's
    evaluation_metadata.jsonl rows), else parsed from the caption; ValueError naming the field or prompt."""
    meta = meta or {}
    if any(key in meta for key in ("tag", "include", "exclude")):
        return rules.checked(meta, f"metadata.{i}")
    try:
        return rules.parse(prompt)
    except ValueError as e:
        raise ValueError(f"prompts.{i}: {e}") from None
