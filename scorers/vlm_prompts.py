"""What the VLM judge (scorers/vlm.py) asks and how it reads the answers, one place per mode.

- pointwise: UnifiedReward's rubric (CodeGoat24/UnifiedReward, as flow_grpo and DiffusionNFT call it): the
  caption in ``Text Caption: [...]``, a 1-5 score after ``Final Score:``, reward score / 5. Any template with
  ``{prompt}`` and any regex with one group may replace it.
- yesno: one token with its top logprobs, P(Yes) / (P(Yes) + P(No)) with the probabilities of every case and
  whitespace variant summed (Flow-Factory's vllm_evaluate canonicalisation); the question a template over the
  caption (VQAScore-style alignment, Lin et al. 2024) or a fixed quality question.
- pairwise: two images of one caption, reasoning in <think></think> and the verdict in <answer></answer>,
  "Image 1 is better" or "Image 2 is better" (Pref-GRPO's UnifiedReward-Think protocol); a tie is 0.5.

The wording below is ours, written from the published descriptions of those prompts. A reply none of the
parsers can read raises ``Unparsable``: the scorer re-asks, it never reads it as a 0.
"""

from __future__ import annotations

import math
import re
from typing import Any

TEMPLATES = {
    "unifiedreward": (
        "<image>\nYou are given a text caption and a generated image based on that caption. Evaluate the image "
        "on two criteria. 1. Alignment with the caption: are the objects, their attributes and their "
        "relationships as the caption describes them? 2. Overall image quality: clarity, detail, colour and "
        "aesthetics. Explain briefly, then give one score from 1 to 5 after 'Final Score:'.\n"
        "Text Caption: [{prompt}]"
    ),
    "vqascore": 'Does this image show "{prompt}"? Answer Yes or No.',
    "quality": (
        "Look at the naturalness, the artifacts, the aesthetics, the detail and the coherence of this image. "
        "Overall, is this a high-quality image? Answer Yes or No."
    ),
    "unifiedreward-think": (
        "Given the caption [{prompt}] and two images generated from it, Image 1 (the first) and Image 2 (the "
        "second), compare them. Score each image from 1 to 10 on semantic consistency with the caption, on "
        "aesthetics and on authenticity, with a short rationale for each, and add up each image's total. Put "
        "all of this reasoning inside <think></think>. Then give the final verdict inside <answer></answer>: "
        "exactly 'Image 1 is better' or 'Image 2 is better'."
    ),
}
DEFAULT_TEMPLATE = {"pointwise": "unifiedreward", "yesno": "vqascore", "pairwise": "unifiedreward-think"}
UNIFIEDREWARD_PATTERN = r"Final Score:\s*([1-5](?:\.\d+)?)"

_VERDICT = re.compile(r"image\s*([12])\s+is\s+(?:the\s+)?better", re.IGNORECASE)
_TIE = re.compile(r"\b(tie|equal|equally|same|neither)\b", re.IGNORECASE)


class Unparsable(ValueError):
    """A reply the mode's parser cannot read; the message says what was missing."""


def template_text(template: str, mode: str) -> str:
    """The template a setting names: a built-in by name, the mode's default when empty, else the text itself."""
    return TEMPLATES.get(template or DEFAULT_TEMPLATE[mode], template)


def parse_pointwise(text: str, pattern: re.Pattern, max_score: float) -> float:
    """The score the pattern's first group captures, divided by ``max_score``."""
    found = pattern.search(text or "")
    if found is None:
        raise Unparsable(f"no match for {pattern.pattern!r}")
    try:
        value = float(found.group(1))
    except ValueError:
        raise Unparsable(f"{found.group(1)!r} (matched by {pattern.pattern!r}) is not a number") from None
    return value / max_score


def canonical(token: str) -> str:
    """A token as the yes/no parser compares it: byte-level and sentencepiece space marks, case and
    surrounding whitespace removed (" Yes", "YES", "Ġyes" and "▁Yes" are all "yes")."""
    return str(token).replace("Ġ", " ").replace("▁", " ").strip().lower()


def parse_yesno(top_logprobs: list[dict[str, Any]] | None) -> float:
    """P(Yes) / (P(Yes) + P(No)) over the first token's top logprobs, variants summed."""
    if not top_logprobs:
        raise Unparsable("the reply has no top logprobs (does the server honour logprobs / top_logprobs?)")
    p = {"yes": 0.0, "no": 0.0}
    for entry in top_logprobs:
        try:
            word, logprob = canonical(entry["token"]), float(entry["logprob"])
        except (KeyError, TypeError, ValueError):
            continue
        if word in p and math.isfinite(logprob):
            p[word] += math.exp(logprob)
    if p["yes"] + p["no"] <= 0:
        shown = [e.get("token") for e in top_logprobs[:10] if isinstance(e, dict)]
        raise Unparsable(f"neither Yes nor No among the first token's top logprobs {shown}")
    return p["yes"] / (p["yes"] + p["no"])


def parse_pairwise(text: str) -> float:
    """How much Image 1 wins: 1.0 (Image 1 is better), 0.0 (Image 2 is better), 0.5 (an explicit tie).
    The verdict is read inside the last <answer></answer>, else after the last </think>."""
    text = text or ""
    answers = re.findall(r"<answer>(.*?)</answer>", text, re.IGNORECASE | re.DOTALL)
    answer = answers[-1] if answers else text.rsplit("</think>", 1)[-1] if "</think>" in text else text
    verdicts = {m.group(1) for m in _VERDICT.finditer(answer)}
    if len(verdicts) == 1:
        return 1.0 if verdicts == {"1"} else 0.0
    if not verdicts and _TIE.search(answer):
        return 0.5
    raise Unparsable("no verdict 'Image 1 is better' / 'Image 2 is better' in the answer")


def body(model: str, images: list[str], text: str, mode: str, max_tokens: int, top_logprobs: int) -> dict[str, Any]:
    """One chat completion request: a user message with the images (data URLs) first, then the text, greedy."""
    content = [{"type": "image_url", "image_url": {"url": url}} for url in images]
    request: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": [*content, {"type": "text", "text": text}]}],
        "temperature": 0.0,
    }
    if mode == "yesno":  # one token is the answer; its logprobs are the score
        request.update(max_tokens=1, logprobs=True, top_logprobs=top_logprobs)
    elif max_tokens:
        request["max_tokens"] = max_tokens
    return request
