"""Prompt alignment judged by LLaVA: ask about the image, then compare or check the answers.

``bertscore`` (default, as ddpo-pytorch): ask "Answer concisely: what is going on in this image?" and score
BERTScore recall of the answer against "The image contains {prompt}". ``strict``: each image's metadata
carries ``questions`` and expected ``answers``; the score is the fraction of expected answers found in
LLaVA's responses. Generation is batched with left padding and greedy decoding up to EOS.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from scorers.devices import dtype_kwarg, half_on_gpu
from scorers.scorer import CHANNELS_LAST, ScoreOutput, Scorer, central
from scorers.tiny_models import resolve

QUESTION = "Answer concisely: what is going on in this image?"
REFERENCE = "The image contains {prompt}"
TEMPLATE = "USER: <image>\n{question} ASSISTANT:"  # llava-1.5's conversation format
IMAGE_TOKEN = "<image>"
MAX_QUESTIONS = 8  # strict mode: per image; each question is one more row in the generate batch


class LlavaScorer(Scorer):
    name = "llava"
    description = "LLaVA prompt alignment: BERTScore recall of its answer vs the prompt (or strict VQA accuracy)"
    max_batch = 16

    def __init__(
        self,
        checkpoint: str = "llava-hf/llava-1.5-7b-hf",
        mode: str = "bertscore",
        bertscore_model: str = "microsoft/deberta-xlarge-mnli",
        bertscore_layer: int | None = None,
        max_new_tokens: int = 32,
    ):
        if mode not in ("bertscore", "strict"):
            raise ValueError(f"--mode must be bertscore or strict, got {mode!r}")
        self.checkpoint, self.mode, self.max_new_tokens = checkpoint, mode, max_new_tokens
        if mode == "bertscore":
            from scorers.bertscore import BertScore

            self.bertscore = BertScore(bertscore_model, bertscore_layer)

    def requirements(self) -> dict[str, tuple[str, str | None, str]]:
        needs = {"checkpoint": ("model", self.checkpoint, "the LLaVA model")}
        if self.mode == "bertscore":
            needs["bertscore_model"] = ("model", self.bertscore.checkpoint, "the BERTScore encoder")
        return needs

    def load(self, device: str = "cpu") -> None:
        import torch
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        path = resolve(self.checkpoint, "llava")
        self.torch, self.device, self.dtype = torch, device, half_on_gpu(device)
        self.model = LlavaForConditionalGeneration.from_pretrained(path, **dtype_kwarg(self.dtype)).to(device).eval()
        self.processor = AutoProcessor.from_pretrained(path)
        self.processor.tokenizer.padding_side = "left"  # batched generation continues every row at its end
        if self.mode == "bertscore":
            self.bertscore.load(device)

    def check(self, prompts: list[str], metadata: list[dict[str, Any]]) -> None:
        if self.mode != "strict":
            return
        for i, meta in enumerate(metadata):
            questions, answers = meta.get("questions"), meta.get("answers")
            if (
                not isinstance(questions, list)
                or not isinstance(answers, list)
                or len(questions) != len(answers)
                or not questions
            ):
                raise ValueError(
                    f"metadata.{i}: strict mode needs equal-length non-empty lists 'questions' and 'answers'"
                )
            if len(questions) > MAX_QUESTIONS:
                raise ValueError(
                    f"metadata.{i}.questions: {len(questions)} questions; at most {MAX_QUESTIONS} per image"
                )
            for j, (question, answer) in enumerate(zip(questions, answers)):
                if not isinstance(question, str) or not isinstance(answer, str):
                    raise ValueError(f"metadata.{i}.questions.{j}: questions and answers must be strings")
                if IMAGE_TOKEN in question:  # the processor would count one image too many: the batch fails
                    raise ValueError(f"metadata.{i}.questions.{j}: must not contain {IMAGE_TOKEN!r}")

    def answer(self, images: np.ndarray, questions: list[str]) -> list[str]:
        """Greedy answers, one per (image, question) pair, in one batched generate call."""
        texts = [TEMPLATE.format(question=q) for q in questions]
        images = [central(image) for image in images]  # LLaVA's processor resizes as CLIP's
        inputs = self.processor(images=images, text=texts, padding=True, return_tensors="pt", **CHANNELS_LAST)
        inputs = {
            k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device) for k, v in inputs.items()
        }
        with self.torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1] :]
        return [text.strip() for text in self.processor.batch_decode(new, skip_special_tokens=True)]

    def score(self, images, prompts, metadata) -> ScoreOutput:
        if self.mode == "bertscore":
            answers = self.answer(images, [QUESTION] * len(images))
            precision, recall, f1 = self.bertscore(answers, [REFERENCE.format(prompt=p) for p in prompts])
            return ScoreOutput(
                recall,
                {"answer": answers, "precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist()},
            )
        # strict: every question of every image, batched together
        owners = [i for i, meta in enumerate(metadata) for _ in meta["questions"]]
        responses = self.answer(images[owners], [q for meta in metadata for q in meta["questions"]])
        scores, answers_per_image, start = [], [], 0
        for meta in metadata:
            n = len(meta["questions"])
            got = responses[start : start + n]
            scores.append(float(np.mean([str(a).lower() in r.lower() for a, r in zip(meta["answers"], got)])))
            answers_per_image.append(got)
            start += n
        return ScoreOutput(np.array(scores), {"answers": answers_per_image})
