"""The HTTP side of the VLM judge (scorers/vlm.py): OpenAI chat-completion calls to any compatible server
(vLLM, SGLang), with a concurrency limit, a per-attempt timeout, and retries with backoff where a retry can
help: connection errors, timeouts, 408, 429 and 5xx. Any other 4xx (a wrong model name, a request the server
refuses) is our configuration's fault and is raised at once; repeating it would only hide it.

The policy is verl-omni's HTTP scorer and Pref-GRPO's vllm_request.py (retry on 429/5xx with exponential
backoff, bounded), written here for httpx; the images travel as data URLs, as every anchor sends them.
"""

from __future__ import annotations

import base64
import io
import random
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

RETRIED_STATUS = {408, 429, 500, 502, 503, 504}


class JudgeCallError(RuntimeError):
    """A call that cannot succeed: retries exhausted (``retryable``) or refused with a 4xx (not)."""

    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


@dataclass
class Reply:
    """What one chat completion said: the text, the first token's top logprobs, and how many retries it took."""

    text: str
    top_logprobs: list[dict[str, Any]] | None
    retries: int = 0
    raw: dict[str, Any] = field(default_factory=dict)


def data_url(image: np.ndarray, fmt: str = "png", resolution: int = 0, quality: int = 95) -> str:
    """A uint8 (H, W, 3) image as a base64 data URL, its longer side resized to ``resolution`` (0: as it is)."""
    from PIL import Image

    picture = Image.fromarray(np.ascontiguousarray(image))
    if resolution and max(picture.size) != resolution:
        w, h = picture.size
        scale = resolution / max(w, h)
        picture = picture.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    if fmt == "jpeg":
        picture.save(buffer, format="JPEG", quality=quality)
    else:
        picture.save(buffer, format="PNG")
    return f"data:image/{fmt};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


class ChatClient:
    """A thread-safe client of one OpenAI-compatible server; the API key is held in memory only."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        timeout: float,
        retries: int,
        backoff: float,
        max_backoff: float,
        concurrency: int,
    ):
        import httpx

        self.base_url, self.retries, self.backoff, self.max_backoff = (
            base_url.rstrip("/"),
            retries,
            backoff,
            max_backoff,
        )
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self.http = httpx.Client(headers=headers, timeout=timeout, limits=limits)

    def models(self) -> list[str]:
        """The model names the server serves (GET /models); JudgeCallError when it cannot be asked."""
        import httpx

        try:
            response = self.http.get(f"{self.base_url}/models")
        except httpx.HTTPError as exc:
            raise JudgeCallError(f"GET {self.base_url}/models failed ({type(exc).__name__}: {exc})", True) from None
        if response.status_code != 200:
            raise JudgeCallError(
                f"GET {self.base_url}/models answered {response.status_code}: {_excerpt(response.text)}", False
            )
        try:
            return [str(m["id"]) for m in response.json()["data"]]
        except (ValueError, KeyError, TypeError):
            raise JudgeCallError(f"GET {self.base_url}/models: not a model list: {_excerpt(response.text)}", False)

    def chat(self, body: dict[str, Any]) -> Reply:
        """POST /chat/completions with retries; the first choice's text and logprobs."""
        import httpx

        url, problem = f"{self.base_url}/chat/completions", ""
        for attempt in range(self.retries + 1):
            wait = None
            try:
                response = self.http.post(url, json=body)
            except httpx.TransportError as exc:  # refused, reset, closed mid-reply, timed out
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 200:
                    return _reply(response, attempt)
                problem = f"HTTP {response.status_code}: {_excerpt(response.text)}"
                if response.status_code not in RETRIED_STATUS:
                    raise JudgeCallError(f"POST {url} answered {problem} (not retried: a 4xx repeats)", False)
                wait = _retry_after(response)
            if attempt < self.retries:
                time.sleep(self._delay(attempt, wait))
        raise JudgeCallError(f"POST {url} failed {self.retries + 1} times; last: {problem}", True)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with jitter (so that parallel calls do not come back together), capped; a
        server's Retry-After is honoured up to the same cap."""
        base = retry_after if retry_after is not None else self.backoff * 2**attempt
        return min(self.max_backoff, base) * (1 + 0.25 * random.random())

    def close(self) -> None:
        self.http.close()


def _reply(response, attempt: int) -> Reply:
    """The first choice of a 200 reply; a body that is not a chat completion reads as an empty text, which the
    judge's parser then refuses (re-asked like any reply it cannot read)."""
    try:
        payload = response.json()
        choice = payload["choices"][0]
        text = choice["message"].get("content") or ""
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return Reply(f"<not a chat completion: {_excerpt(response.text)}>", None, attempt)
    logprobs = choice.get("logprobs") or {}
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    top = content[0].get("top_logprobs") if content and isinstance(content[0], dict) else None
    return Reply(text, top if isinstance(top, list) else None, attempt, payload)


def _retry_after(response) -> float | None:
    try:
        return max(0.0, float(response.headers.get("retry-after", "")))
    except ValueError:
        return None


def _excerpt(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."
