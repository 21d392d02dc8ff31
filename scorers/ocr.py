"""OCR reward, as Flow-GRPO trains text rendering (Liu et al. 2025, yifan123/flow_grpo flow_grpo/ocr.py):
1 - normalised edit distance between the text in the prompt's quotes and what an OCR model reads.

Flow-GRPO reads with PaddleOCR (text detection, then recognition of each line); here the reader is a
transformers OCR model (``--checkpoint``): GOT-OCR2 (``stepfun-ai/GOT-OCR-2.0-hf``, the default, reads a
whole scene) or any vision encoder-decoder such as TrOCR (``microsoft/trocr-base-printed``, which reads one
line: best on crops). The rule is Flow-GRPO's: the target is the prompt's first quoted span, both texts are
lowercased with spaces removed, the distance is 0 when the target appears inside what was read, else their
Levenshtein distance capped at the target's length, and the score is 1 - distance / target length.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from scorers.devices import dtype_kwarg, half_on_gpu
from scorers.scorer import CHANNELS_LAST, ScoreOutput, Scorer
from scorers.tiny_models import resolve


def levenshtein(a: str, b: str) -> int:
    """Edits (insert, delete, substitute; one each) that turn ``a`` into ``b``: rapidfuzz's C++ (bit-parallel),
    since the pure-Python table of 32,000 quoted characters held the scorer for 20 s."""
    from rapidfuzz.distance import Levenshtein

    return Levenshtein.distance(a, b)


def target(prompt: str) -> str:
    """The prompt's first quoted text (Flow-GRPO: ``prompt.split('"')[1]``); ValueError when there is none."""
    parts = prompt.split('"')
    if len(parts) < 3 or not parts[1].replace(" ", ""):
        raise ValueError(f"{prompt!r} has no text in double quotes to read (e.g. 'a sign that says \"OPEN\"')")
    return parts[1]


def reward(read: str, wanted: str) -> float:
    """Flow-GRPO's OCR reward of the text ``read`` for the quoted text ``wanted``."""
    read, wanted = read.replace(" ", "").lower(), wanted.replace(" ", "").lower()
    distance = 0 if wanted in read else min(levenshtein(read, wanted), len(wanted))
    return 1 - distance / len(wanted)


class OcrScorer(Scorer):
    name = "ocr"
    description = "OCR: 1 - normalised edit distance between the prompt's quoted text and what the OCR model reads"
    max_batch = 16
    max_prompt_chars = 1_000  # Flow-GRPO's quoted texts are words; the edit distance grows with the quote

    def __init__(self, checkpoint: str = "stepfun-ai/GOT-OCR-2.0-hf", max_new_tokens: int = 64):
        self.checkpoint, self.max_new_tokens = checkpoint, int(max_new_tokens)

    def requirements(self) -> dict[str, tuple[str, str | None, str]]:
        return {"checkpoint": ("model", self.checkpoint, "the OCR model")}

    def load(self, device: str = "cpu") -> None:
        import torch
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, VisionEncoderDecoderModel

        path = resolve(self.checkpoint, "ocr")
        self.torch, self.device, self.dtype = torch, device, half_on_gpu(device)
        # TrOCR-like models are encoder-decoders; GOT-OCR2, Florence-2 and the like are image-text-to-text
        self.encoder_decoder = AutoConfig.from_pretrained(path).model_type == "vision-encoder-decoder"
        cls = VisionEncoderDecoderModel if self.encoder_decoder else AutoModelForImageTextToText
        self.model = cls.from_pretrained(path, **dtype_kwarg(self.dtype)).to(device).eval()
        self.processor = AutoProcessor.from_pretrained(path)

    def check(self, prompts, metadata) -> None:
        for i, prompt in enumerate(prompts):
            _target(i, prompt)

    def read(self, images: np.ndarray) -> list[str]:
        """The text the model reads in each image (greedy decoding)."""
        inputs = self.processor(images=list(images), return_tensors="pt", **CHANNELS_LAST)
        inputs = {
            k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device) for k, v in inputs.items()
        }
        with self.torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        if not self.encoder_decoder:  # decoder-only: the prompt comes back in front of the answer
            out = out[:, inputs["input_ids"].shape[1] :]
        return [text.strip() for text in self.processor.batch_decode(out, skip_special_tokens=True)]

    def score(self, images, prompts, metadata) -> ScoreOutput:
        wanted = [_target(i, p) for i, p in enumerate(prompts)]
        read = self.read(images)
        return ScoreOutput(
            np.array([reward(r, w) for r, w in zip(read, wanted)], dtype=np.float64), {"read": read, "target": wanted}
        )


def _target(i: int, prompt: str) -> Any:
    try:
        return target(prompt)
    except ValueError as e:
        raise ValueError(f"prompts.{i}: {e}") from None
