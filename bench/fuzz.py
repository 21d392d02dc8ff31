"""The fuzzing drill at length: hypothesis-generated bodies and crafted attacks against a live reward server.

    python -m bench.fuzz [--cases 10000] [--attacks 20] [--endpoint score_grad]

Hypothesis bodies use the strategies of tests/test_drills.py (garbage bytes, any msgpack value, valid requests
with one field replaced). Interleaved with them, each attack body is sent ``--attacks`` times: element-heavy
(3 MB of three million empty arrays), deep (100,000 nested arrays), wide (a map of 1.5 million entries),
a compressed bomb (64 solid 1024 px PNGs: 1 MB that would decode to 192 MiB) and a valid request with
metadata just under the element budget. ``--endpoint score_grad`` fuzzes /v1/score_grad of the tiny-shapes
aesthetic scorer instead (float images of any values among the bodies; tests/test_drills.py's
``grad_bodies``). (A large valid request of raw images costs its body plus one batch copy, 2x by design;
bench/protocol.py measures those.) A thread polls /healthz all the while.

Prints JSON: responses by status (and per attack), 5xx count (must be 0), /healthz latency p50/p99/max during
the run (target p99 < 250 ms), and the server's peak RSS growth against the largest body it accepted,
counting an admitted request's decoded pixels as its size (target < 2x).
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def attack_bodies() -> dict[str, bytes]:
    import msgpack

    from protocol import build_request

    n = 3_000_000
    wide_n = 1_500_000
    wide = b"\xdf" + wide_n.to_bytes(4, "big") + b"".join(msgpack.packb(f"k{i}") + b"\xc0" for i in range(wide_n))
    solid = np.full((64, 1024, 1024, 3), 200, np.uint8)
    metadata_heavy = msgpack.unpackb(build_request(np.zeros((1, 8, 8, 3), np.uint8), ["a"]))
    metadata_heavy["metadata"] = [{"tags": list(range(95_000))}]
    return {
        "element_heavy": b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n,
        "deep": b"\x91" * 100_000 + b"\xc0",
        "wide": wide,
        "compressed_bomb": build_request(solid, ["a"] * 64, encoding="png"),
        "metadata_heavy": msgpack.packb(metadata_heavy, use_bin_type=True),
    }


def decoded_size(body: bytes, budget: int) -> int:
    """A request's claim on server memory: its body, or its images' decoded pixels when larger (and admitted
    under the bench server's budget; the bomb is refused before decoding)."""
    from protocol import parse_request

    try:
        request = parse_request(body)
    except Exception:
        return len(body)
    decoded = sum(i.height * i.width * i.channels for i in request.images)
    return max(len(body), decoded if decoded <= budget else 0)


def peak_rss(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--attacks", type=int, default=20, help="times each attack body is sent")
    parser.add_argument("--endpoint", choices=["score", "score_grad"], default="score")
    parser.add_argument("--max-decoded-mb", type=float, default=64.0, help="the server's decoded-pixel budget")
    args = parser.parse_args()

    import httpx
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from protocol import MEDIA_TYPE
    from tests.conftest import ServerProcess
    from tests.test_drills import bodies, grad_bodies

    attacks = attack_bodies()
    # Every attack body is within the server's body limit, so the server reads each: the largest it takes on
    # is the largest body, or the decoded pixels of one it admits (hypothesis bodies are all tiny).
    largest_accepted = max(decoded_size(body, int(args.max_decoded_mb * 2**20)) for body in attacks.values())
    every = max(1, args.cases // max(1, args.attacks * len(attacks)))
    statuses: collections.Counter = collections.Counter()
    per_attack: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    latencies, stop = [], threading.Event()
    with tempfile.TemporaryDirectory() as tmp:
        scorer = ["compression"] if args.endpoint == "score" else ["aesthetic", "--checkpoint", "tiny-shapes"]
        server = ServerProcess(
            "--model",
            *scorer,
            "--log-level",
            "error",
            "--max-decoded-mb",
            str(args.max_decoded_mb),
            log=Path(tmp) / "server.log",
        ).wait_ready()

        def poll_health():
            with httpx.Client(timeout=30) as health:
                while not stop.is_set():
                    start = time.perf_counter()
                    health.get(f"{server.url}/healthz")
                    latencies.append(time.perf_counter() - start)
                    time.sleep(0.01)

        client = httpx.Client(timeout=60)
        rss_before = peak_rss(server.proc.pid)
        poller = threading.Thread(target=poll_health, daemon=True)
        poller.start()
        sent, rounds = [0], [0]
        try:

            def post(body: bytes, content_type: str = MEDIA_TYPE) -> int:
                status = client.post(
                    f"{server.url}/v1/{args.endpoint}", content=body, headers={"content-type": content_type}
                ).status_code
                statuses[status] += 1
                return status

            @settings(max_examples=args.cases, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            @given(
                body=bodies if args.endpoint == "score" else grad_bodies,
                content_type=st.sampled_from([MEDIA_TYPE, MEDIA_TYPE, "application/json", ""]),
            )
            def send(body, content_type):
                post(body, content_type)
                sent[0] += 1
                if sent[0] % every == 0 and rounds[0] < args.attacks:
                    rounds[0] += 1
                    for name, attack in attacks.items():
                        per_attack[name][post(attack)] += 1

            send()
            stop.set()
            poller.join()
            healthy = server.healthy()
            rss_growth = peak_rss(server.proc.pid) - rss_before
        finally:
            stop.set()
            server.stop()
    ms = np.array(latencies) * 1000
    print(
        json.dumps(
            {
                "benchmark": "fuzz",
                "endpoint": f"/v1/{args.endpoint}",
                "cases": sum(statuses.values()),
                "by_status": dict(sorted(statuses.items())),
                "attacks": {name: dict(sorted(c.items())) for name, c in per_attack.items()},
                "attack_bytes": {name: len(body) for name, body in attacks.items()},
                "server_errors_5xx": sum(n for s, n in statuses.items() if s >= 500 and s != 503),
                "healthy_after": healthy,
                "healthz": {
                    "polls": len(ms),
                    "p50_ms": round(float(np.percentile(ms, 50)), 2),
                    "p99_ms": round(float(np.percentile(ms, 99)), 2),
                    "max_ms": round(float(ms.max()), 2),
                },
                "peak_rss_growth_mb": round(rss_growth / 2**20, 1),
                "largest_accepted_mb": round(largest_accepted / 2**20, 1),
                "rss_growth_over_largest_accepted": round(rss_growth / max(1, largest_accepted), 2),
            }
        )
    )


if __name__ == "__main__":
    main()
