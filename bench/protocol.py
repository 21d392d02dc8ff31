"""Wire overhead: 32 images of 512x512x3 uint8 through the real server and client vs raw bytes.

    python -m bench.protocol

Starts one uvicorn server (subprocess, 127.0.0.1) hosting our app with a zero-cost scorer plus two baseline
routes: /echo returns the raw body (the issue's baseline) and /sink returns its length (stricter: upload
only, like our small reply). The baselines post the bare image bytes with httpx.AsyncClient, the transport
RewardClient uses, so the ratio isolates our protocol work; the same echo through httpx's sync client is
printed too (it uploads faster than the async one on loopback). Prints JSON: encode/decode times,
round-trip images/s for raw and png, and the ratios. Pickle's in-process figure is for reference only (we
never unpickle network bodies).
"""

from __future__ import annotations

import asyncio
import json
import pickle
import subprocess
import sys
import time

import httpx
import numpy as np
from fastapi import Request, Response  # module level: the routes' (string) annotations must resolve

from bench import timing

N, SIZE, REPEATS = 32, 512, 15


def serve(port: int) -> None:
    import uvicorn

    from protocol import Limits
    from reward_servers.app import create_app
    from reward_servers.cli import keep_freed_memory
    from reward_servers.service import ServingOptions
    from scorers.scorer import ScoreOutput, Scorer

    keep_freed_memory()  # as reward-server does

    class NullScorer(Scorer):
        name, description = "null", "zero for every image (benchmark)"

        def score(self, images, prompts, metadata):
            return ScoreOutput(np.zeros(len(images)))

    app = create_app(NullScorer, ServingOptions(limits=Limits(max_body_bytes=1 << 30)))

    @app.post("/echo")
    async def echo(request: Request) -> Response:
        return Response(await request.body(), media_type="application/octet-stream")

    @app.post("/sink")
    async def sink(request: Request) -> Response:
        return Response(str(len(await request.body())).encode(), media_type="text/plain")

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def median_seconds(fn, repeats: int = REPEATS) -> float:
    return timing.median_seconds(fn, repeats)


def main() -> None:
    from protocol import RewardClient, build_request, decode_images, parse_request
    from tests.conftest import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "bench.protocol", "--serve", str(port)])
    try:
        for _ in range(200):
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        images = np.random.default_rng(0).integers(0, 256, (N, SIZE, SIZE, 3), dtype=np.uint8)
        prompts = ["a photo of a cat"] * N
        body = build_request(images, prompts)
        result = {
            "benchmark": "protocol",
            "images": N,
            "shape": [SIZE, SIZE, 3],
            "payload_mb": round(len(body) / 1e6, 2),
        }
        result["encode_ms"] = round(1000 * median_seconds(lambda: build_request(images, prompts)), 2)
        result["decode_ms"] = round(1000 * median_seconds(lambda: decode_images(parse_request(body, _limits()))), 2)

        loop = asyncio.new_event_loop()
        client = RewardClient(url)
        raw_async = httpx.AsyncClient(timeout=60)  # the transport RewardClient itself uses
        raw_sync = httpx.Client(timeout=60)
        payload = images.tobytes()
        # Sent as ours is, one image per write: one 25 MB write makes h11 build a fresh 25 MB copy.
        length = {"content-length": str(len(payload))}

        async def chunks():
            for image in images:
                yield image.reshape(-1).data

        def run(coroutine_fn):
            return lambda: loop.run_until_complete(coroutine_fn())

        async def post_async(route):
            return (await raw_async.post(f"{url}/{route}", content=chunks(), headers=length)).raise_for_status().content

        def post_sync(route):
            return (
                raw_sync.post(f"{url}/{route}", content=(im.reshape(-1).data for im in images), headers=length)
                .raise_for_status()
                .content
            )

        assert len(loop.run_until_complete(post_async("echo"))) == len(payload)  # a baseline that really echoes

        variants = {
            "ours_raw": run(lambda: client.score(images, prompts)),
            "raw_echo": run(lambda: post_async("echo")),
            "raw_sink": run(lambda: post_async("sink")),
            "raw_echo_sync_client": lambda: post_sync("echo"),
        }
        rates = {name: N / seconds for name, seconds in timing.interleaved_medians(variants, 3 * REPEATS).items()}
        rates["ours_png"] = N / median_seconds(run(lambda: client.score(images, prompts, encoding="png")), repeats=3)
        result["images_per_s"] = {k: round(v, 1) for k, v in rates.items()}
        result["ratio_ours_raw_vs_raw_echo"] = round(rates["ours_raw"] / rates["raw_echo"], 3)
        result["ratio_ours_raw_vs_raw_sink"] = round(rates["ours_raw"] / rates["raw_sink"], 3)
        result["ratio_ours_raw_vs_raw_echo_sync_client"] = round(rates["ours_raw"] / rates["raw_echo_sync_client"], 3)
        result["target"] = ">= 0.85 vs raw echo (both through httpx.AsyncClient)"
        obj = {"images": [im.tobytes() for im in images], "prompts": prompts}
        result["reference_pickle_dumps_loads_ms"] = round(
            1000 * median_seconds(lambda: pickle.loads(pickle.dumps(obj))), 2
        )
        loop.run_until_complete(client.aclose())
        loop.run_until_complete(raw_async.aclose())
        print(json.dumps(result))
    finally:
        server.terminate()
        server.wait(timeout=10)


def _limits():
    from protocol import Limits

    return Limits(max_body_bytes=1 << 30)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        serve(int(sys.argv[2]))
    else:
        main()
