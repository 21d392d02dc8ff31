"""A stand-in OpenAI-compatible VLM server for tests: ``GET /v1/models`` and ``POST /v1/chat/completions``
(with logprobs), whose judgement is honest on the shapes world: it reads the caption out of the question,
checks the image with the shapes verifier (scorers/shapes.py) and answers as the real judges format their
answers (UnifiedReward's "Final Score:", a Yes/No token with top logprobs, Pref-GRPO's <answer>).

Faults are queued with ``POST /_faults {"faults": [...]}`` and each is spent on one chat request, in order:
``slow`` (answers after ``slow_s``), ``429``, ``500``, ``garbage`` (a 200 reply no parser can read), ``notjson``
(a 200 whose body is not JSON), ``close`` (the connection dropped mid-reply). ``GET /_stats`` counts the chat
requests, the faults spent and the judgements given. Run: ``python tests/vlm_standin.py --port N --model NAME``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import math
import re
from collections import Counter, deque

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from scorers import shapes, world

CAPTION = (re.compile(r"Caption: \[(.+?)\]"), re.compile(r"caption \[(.+?)\]"), re.compile(r'"(.+)"'))


def caption_of(text: str) -> str | None:
    for pattern in CAPTION:
        found = pattern.search(text)
        if found:
            return found.group(1)
    return None


def decode(url: str) -> np.ndarray:
    """A data URL's image at the shapes world's resolution (nearest: no new colours at the edges)."""
    from PIL import Image

    picture = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
    if picture.size != (world.RESOLUTION, world.RESOLUTION):
        picture = picture.resize((world.RESOLUTION, world.RESOLUTION), Image.Resampling.NEAREST)
    return np.asarray(picture)


def truth(url: str, caption: str | None) -> float:
    """The verifier's fraction of the caption's claims the image satisfies (0.5 without a caption)."""
    if caption is None:
        return 0.5
    return shapes.verify(decode(url), world.claims(caption))[0]


def completion(model: str, text: str, top: list[dict] | None = None) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
    if top is not None:
        first = max(top, key=lambda t: t["logprob"])
        choice["logprobs"] = {"content": [{"token": first["token"], "logprob": first["logprob"], "top_logprobs": top}]}
    return {"id": "standin", "object": "chat.completion", "model": model, "choices": [choice]}


def p_yes(score: float) -> float:
    """The stand-in's P(Yes) for an image satisfying ``score`` of its claims (never exactly 0 or 1)."""
    return 0.02 + 0.96 * score


def yes_no_logprobs(score: float) -> list[dict]:
    """Top logprobs spread over variants, as real tokenisers split them: the scorer must sum them."""
    yes, no = p_yes(score), 1 - p_yes(score)
    parts = [("Yes", 0.7 * yes), (" yes", 0.2 * yes), ("YES", 0.1 * yes), ("No", 0.8 * no), (" no", 0.2 * no)]
    return [{"token": t, "logprob": math.log(p)} for t, p in parts] + [{"token": "Maybe", "logprob": math.log(1e-4)}]


def judge(request: dict) -> dict:
    content = request["messages"][-1]["content"]
    urls = [c["image_url"]["url"] for c in content if c.get("type") == "image_url"]
    text = " ".join(c["text"] for c in content if c.get("type") == "text")
    caption = caption_of(text)
    model = request["model"]
    if request.get("logprobs"):
        score = truth(urls[0], caption)
        return completion(model, "Yes" if p_yes(score) > 0.5 else "No", yes_no_logprobs(score))
    if len(urls) == 2:
        a, b = truth(urls[0], caption), truth(urls[1], caption)
        verdict = "Image 1 is better" if a > b else "Image 2 is better" if b > a else "It is a tie: equally good"
        return completion(
            model, f"<think>Image 1 meets {a:.2f} of the caption, Image 2 {b:.2f}.</think><answer>{verdict}</answer>"
        )
    score = truth(urls[0], caption)
    return completion(model, f"The image meets {score:.2f} of the caption.\nFinal Score: {1 + 4 * score:.2f}")


def create_app(model: str) -> FastAPI:
    app = FastAPI()
    state = {"faults": deque(), "slow_s": 2.0, "stats": Counter()}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": model, "object": "model", "owned_by": "standin"}]}

    @app.post("/_faults")
    async def faults(request: Request):
        given = await request.json()
        state["faults"] = deque(given.get("faults", []))
        state["slow_s"] = float(given.get("slow_s", 2.0))
        state["stats"] = Counter()  # a slow reply of the test before, finishing later, counts into its own
        return {"queued": len(state["faults"])}

    @app.get("/_stats")
    def stats():
        return dict(state["stats"])

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        try:
            body = await request.json()
            asked = body["model"]
            body["messages"][-1]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            return JSONResponse({"error": {"message": f"malformed request: {exc!r}"}}, status_code=400)
        stats = state["stats"]  # the counter of the test that sent it, even if the next one has reset them
        stats["requests"] += 1
        if asked != model:  # as vLLM answers
            return JSONResponse(
                {"error": {"message": f"The model `{asked}` does not exist.", "type": "NotFoundError"}}, 404
            )
        fault = state["faults"].popleft() if state["faults"] else None
        if fault:
            stats[f"fault_{fault}"] += 1
        if fault == "slow":
            await asyncio.sleep(state["slow_s"])
        elif fault in ("429", "500"):
            return JSONResponse({"error": {"message": f"injected {fault}"}}, int(fault), headers={"retry-after": "0"})
        elif fault == "garbage":
            return completion(model, "I would rather talk about the weather.", [{"token": "I", "logprob": -0.01}])
        elif fault == "notjson":
            return PlainTextResponse("<html>bad gateway</html>")
        stats["judged"] += 1
        return judge(body)

    async def asgi(scope, receive, send):
        # "close" drops the connection after the reply has begun: only the raw ASGI level can do that
        if scope["type"] == "http" and scope["path"] == "/v1/chat/completions" and state["faults"]:
            if state["faults"][0] == "close":
                state["faults"].popleft()
                state["stats"]["fault_close"] += 1
                state["stats"]["requests"] += 1
                while (await receive()).get("more_body"):
                    pass
                await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"999")]})
                await send({"type": "http.response.body", "body": b'{"choi', "more_body": True})
                raise ConnectionAbortedError("stand-in: connection closed mid-reply (injected fault)")
        await app(scope, receive, send)

    return asgi


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="standin-judge")
    args = parser.parse_args()
    uvicorn.run(create_app(args.model), host="127.0.0.1", port=args.port, log_level="critical")


if __name__ == "__main__":
    main()
