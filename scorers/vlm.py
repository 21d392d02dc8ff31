"""A VLM judge as a reward, through any OpenAI-compatible chat server (vLLM, SGLang): pointwise, yes/no or
pairwise (scorers/vlm_prompts.py says what each asks and how it reads the answer).

Where the anchors' clients break, this one does not: flow_grpo and DiffusionNFT score an unparsable reply
0.0 and train on it, Flow-Factory scores a call that failed its retries 0.0. Here such a sample is asked
again (``reasks`` times), then either dropped from the update (``on_failure=drop``: the info says
``dropped`` 1, the trainer gives it no advantage) or the run stops with the reply in the message
(``on_failure=stop``). Each image's info counts ``reasked``, ``failed_calls`` (asks whose call failed after
all its retries) and ``dropped``; the trainer sums them into metrics.jsonl. A 4xx other than 408/429 (a wrong
model name) always stops: it is a setting to fix, not a sample to lose.

The API key is read from the environment variable ``api_key_env`` names and kept in memory only: options,
config.json, logs and errors carry the variable's name, never its value.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from scorers import vlm_prompts as prompts_
from scorers.scorer import ScoreOutput, Scorer
from scorers.vlm_client import ChatClient, JudgeCallError, data_url

MODES = ("pointwise", "yesno", "pairwise")
log = logging.getLogger(__name__)


class JudgeError(RuntimeError):
    """The judge gave no usable answer and ``on_failure`` is stop, or the server refused the request."""


@dataclass
class Outcome:
    value: float | None  # None: no usable answer after every ask
    reasked: int
    failed: int
    reply: str


def _number(name: str, value: Any, kind=float, low: float | None = None) -> Any:
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a{'n integer' if kind is int else ' number'}, got {value!r}") from None
    if low is not None and number < low:
        raise ValueError(f"{name}: must be at least {low}, got {value!r}")
    return number


def _template_and_pattern(template: str, pattern: str, mode: str) -> tuple[str, re.Pattern]:
    """The question's text (a built-in by name, or the text given) and the pointwise score's regex, checked."""
    text = prompts_.template_text(template, mode)
    if "{prompt}" in text or mode != "yesno":  # a fixed yes/no question may hold braces of its own
        try:
            text.format(prompt="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"template: only {{prompt}} may appear in braces ({exc!r})") from None
    try:
        compiled = re.compile(pattern or prompts_.UNIFIEDREWARD_PATTERN)
    except re.error as exc:
        raise ValueError(f"pattern: not a regular expression ({exc})") from None
    if compiled.groups < 1:
        raise ValueError(f"pattern: {compiled.pattern!r} needs a group capturing the score")
    return text, compiled


class VlmScorer(Scorer):
    name = "vlm"
    description = "a VLM judge over the OpenAI chat API: pointwise score, P(Yes) or pairwise win rate, in [0, 1]"
    max_batch = 256  # pairwise compares images of one prompt within a batch: keep groups whole

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000/v1",
        model: str = "",
        mode: str = "pointwise",
        api_key_env: str = "",
        template: str = "",
        pattern: str = "",
        max_score: float = 5.0,
        image_format: str = "png",
        resolution: int = 512,
        jpeg_quality: int = 95,
        concurrency: int = 16,
        timeout: float = 120.0,
        retries: int = 4,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        reasks: int = 2,
        on_failure: str = "drop",
        max_tokens: int = 0,
        top_logprobs: int = 20,
        pairs_per_image: int = 0,
        cache_size: int = 4096,
    ):
        if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", str(base_url)):
            raise ValueError(f"base_url: expected http(s)://host[:port]/v1, got {base_url!r}")
        if not str(model).strip():
            raise ValueError("model: name the judge model the server serves (its GET /v1/models lists them)")
        if mode not in MODES:
            raise ValueError(f"mode: choose one of {', '.join(MODES)}, got {mode!r}")
        if api_key_env and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(api_key_env)):
            # never echo it: a key pasted here by mistake must not reach a log
            raise ValueError("api_key_env: must be the NAME of an environment variable holding the key, not the key")
        if image_format not in ("png", "jpeg"):
            raise ValueError(f"image_format: choose png or jpeg, got {image_format!r}")
        if on_failure not in ("drop", "stop"):
            raise ValueError(f"on_failure: choose drop or stop, got {on_failure!r}")
        self.base_url, self.model, self.mode, self.api_key_env = (
            str(base_url).rstrip("/"),
            str(model),
            mode,
            api_key_env,
        )
        self.template, self.pattern = _template_and_pattern(str(template), str(pattern), mode)
        self.max_score = _number("max_score", max_score, float)
        if self.max_score <= 0:
            raise ValueError(f"max_score: must be positive, got {max_score!r}")
        self.image_format = image_format
        self.resolution = _number("resolution", resolution, int, 0)
        self.jpeg_quality = _number("jpeg_quality", jpeg_quality, int, 1)
        self.concurrency = _number("concurrency", concurrency, int, 1)
        self.timeout = _number("timeout", timeout, float, 0.001)
        self.retries = _number("retries", retries, int, 0)
        self.backoff = _number("backoff", backoff, float, 0)
        self.max_backoff = _number("max_backoff", max_backoff, float, 0)
        self.reasks = _number("reasks", reasks, int, 0)
        self.on_failure = on_failure
        # pairwise ranks the images of one prompt against each other: a video's frames would be ranked against
        # each other and the frames of the other videos, which says nothing about the video (scorers/video.py)
        self.per_frame = mode != "pairwise"
        self.max_tokens = _number("max_tokens", max_tokens, int, 0) or (4096 if mode == "pairwise" else 0)
        self.top_logprobs = _number("top_logprobs", top_logprobs, int, 1)
        self.pairs_per_image = _number("pairs_per_image", pairs_per_image, int, 0)
        self.cache_size = _number("cache_size", cache_size, int, 0)
        self._cache: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()
        self.client = None

    # -- setup -----------------------------------------------------------------------------------------------
    def _api_key(self) -> str | None:
        if not self.api_key_env:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise ValueError(f"api_key_env: the environment variable {self.api_key_env} is not set (or empty)")
        return key

    def problems(self) -> dict[str, str]:
        """What would stop the judge, by option, asked before any model loads: the key's variable unset, the
        server unreachable, the model not among those it serves."""
        try:
            key = self._api_key()
        except ValueError as exc:
            return {"api_key_env": str(exc).removeprefix("api_key_env: ")}
        client = ChatClient(self.base_url, key, min(self.timeout, 10.0), 0, 0.0, 0.0, 1)
        try:
            served = client.models()
        except JudgeCallError as exc:
            return {"base_url": str(exc)}
        finally:
            client.close()
        if self.model not in served:
            return {"model": f"{self.base_url} serves {', '.join(map(repr, served)) or 'no model'}, not {self.model!r}"}
        return {}

    def load(self, device: str = "cpu") -> None:
        # Hosted by reward-server nothing ran the trainer's preflight: a model the judge does not serve (or the
        # key's variable unset) fails start-up here; a judge still starting is only logged, the retries wait.
        found = self.problems()
        for option in ("api_key_env", "model"):
            if option in found:
                raise ValueError(f"{option}: {found[option]}")
        if found:
            log.warning("vlm judge: %s (scoring will retry)", found["base_url"])
        self.client = ChatClient(
            self.base_url, self._api_key(), self.timeout, self.retries, self.backoff, self.max_backoff, self.concurrency
        )
        self.pool = concurrent.futures.ThreadPoolExecutor(self.concurrency, thread_name_prefix="vlm-judge")

    def check(self, prompts: list[str], metadata: list[dict[str, Any]]) -> None:
        if self.mode != "pairwise":
            return
        for i, prompt in enumerate(prompts):
            if prompts.count(prompt) < 2:
                raise ValueError(
                    f"prompts.{i}: pairwise mode compares images of one prompt: send at least 2 images of "
                    f"{prompt!r} in one request"
                )

    # -- asking ----------------------------------------------------------------------------------------------
    def _ask(self, images: list[str], prompt: str) -> Outcome:
        """One judgement, cached by the request's content: asked, then re-asked while the reply cannot be read
        or the call fails after its retries; a 4xx raises JudgeError at once."""
        text = self.template.format(prompt=prompt) if "{prompt}" in self.template else self.template
        request = prompts_.body(self.model, images, text, self.mode, self.max_tokens, self.top_logprobs)
        key = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return Outcome(self._cache[key], 0, 0, "(cached)")
        reasked = failed = 0
        last = ""
        for ask in range(self.reasks + 1):
            reasked += ask > 0
            try:
                reply = self.client.chat(request)
            except JudgeCallError as exc:
                if not exc.retryable:
                    raise JudgeError(f"vlm judge {self.model!r}: {exc}") from None
                failed, last = failed + 1, str(exc)
                continue
            try:
                value = self._parse(reply)
            except prompts_.Unparsable as exc:
                last = f"unparsable reply {reply.text[:500]!r} ({exc})"
                continue
            self._remember(key, value)
            return Outcome(value, reasked, failed, reply.text[:200])
        return Outcome(None, reasked, failed, last)

    def _parse(self, reply) -> float:
        if self.mode == "yesno":
            return prompts_.parse_yesno(reply.top_logprobs)
        if self.mode == "pairwise":
            return prompts_.parse_pairwise(reply.text)
        return prompts_.parse_pointwise(reply.text, self.pattern, self.max_score)

    def _remember(self, key: str, value: float) -> None:
        if not self.cache_size:
            return
        with self._lock:
            self._cache[key] = value
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def _all(self, jobs: list[tuple[list[str], str]]) -> list[Outcome]:
        futures = [self.pool.submit(self._ask, images, prompt) for images, prompt in jobs]
        return [f.result() for f in futures]

    # -- scoring ---------------------------------------------------------------------------------------------
    def score(self, images, prompts, metadata) -> ScoreOutput:
        if self.client is None:
            raise RuntimeError("vlm judge: load() was not called")
        urls = [data_url(im, self.image_format, self.resolution, self.jpeg_quality) for im in images]
        if self.mode == "pairwise":
            self.check(list(prompts), metadata)  # in process nothing called check() first
            values, info = self._pairwise(urls, list(prompts))
        else:
            outcomes = self._all([([url], prompt) for url, prompt in zip(urls, prompts)])
            values = [o.value for o in outcomes]
            info = {
                "reasked": [o.reasked for o in outcomes],
                "failed_calls": [o.failed for o in outcomes],
                "reply": [o.reply for o in outcomes],
            }
        missing = [i for i, v in enumerate(values) if v is None]
        if missing and self.on_failure == "stop":
            i = missing[0]
            raise JudgeError(
                f"vlm judge {self.model!r}: image {i} ({prompts[i]!r}): no usable answer after "
                f"{self.reasks + 1} asks (on_failure=stop; on_failure=drop leaves it out of the update); "
                f"last: {info['reply'][i]}"
            )
        info["dropped"] = [int(v is None) for v in values]
        return ScoreOutput(stand_ins(values, list(prompts)), info)

    def _pairwise(self, urls: list[str], prompts: list[str]) -> tuple[list[float | None], dict[str, list]]:
        """Each image's win rate against the others of its prompt (every pair, or ``pairs_per_image`` each);
        a pair without a usable verdict counts for neither image. Re-asks and failures of a pair are counted
        on its first image, so that their sum over images is the number of pairs."""
        pairs = []
        for prompt in dict.fromkeys(prompts):
            members = [i for i, p in enumerate(prompts) if p == prompt]
            pairs += group_pairs(members, self.pairs_per_image)
        outcomes = self._all([([urls[i], urls[j]], prompts[i]) for i, j in pairs])
        n = len(prompts)
        wins, comparisons = np.zeros(n), np.zeros(n, dtype=int)
        info: dict[str, list] = {"reasked": [0] * n, "failed_calls": [0] * n, "reply": [""] * n}
        for (i, j), o in zip(pairs, outcomes):
            info["reasked"][i] += o.reasked
            info["failed_calls"][i] += o.failed
            if o.value is None:
                info["reply"][i] = info["reply"][j] = o.reply
                continue
            wins[i], wins[j] = wins[i] + o.value, wins[j] + 1 - o.value
            comparisons[i] += 1
            comparisons[j] += 1
        values = [float(wins[k] / comparisons[k]) if comparisons[k] else None for k in range(n)]
        for k in range(n):
            if comparisons[k]:
                info["reply"][k] = f"won {wins[k]:g} of {comparisons[k]}"
        info["comparisons"] = comparisons.tolist()
        return values, info

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.pool.shutdown(wait=False, cancel_futures=True)


def group_pairs(members: list[int], per_image: int = 0) -> list[tuple[int, int]]:
    """The pairs judged within one prompt's images: all of them (C(G, 2)), or each image against the
    ``per_image`` images after it, cyclically (about 2 ``per_image`` comparisons per image)."""
    g = len(members)
    if not per_image or per_image >= g - 1:
        return [(members[a], members[b]) for a in range(g) for b in range(a + 1, g)]
    chosen = {tuple(sorted((a, (a + d) % g))) for a in range(g) for d in range(1, per_image + 1)}
    return [(members[a], members[b]) for a, b in sorted(chosen)]


def stand_ins(values: list[float | None], prompts: list[str]) -> np.ndarray:
    """The scores, a dropped image's (None) replaced by the mean of its prompt's other scores in the batch
    (else of the batch, else 0): never used for its own update (``dropped`` 1 gives it no advantage), it only
    keeps the run's reward statistics from moving toward a made-up number."""
    kept = [v for v in values if v is not None]
    out = []
    for v, p in zip(values, prompts):
        if v is None:
            same = [w for w, q in zip(values, prompts) if q == p and w is not None]
            v = float(np.mean(same)) if same else float(np.mean(kept)) if kept else 0.0
        out.append(v)
    return np.asarray(out, dtype=np.float64)
