"""The fuzzing drill at length: hypothesis-generated bodies against a live reward server.

    python -m bench.fuzz [--cases 10000]

Same strategies as tests/test_drills.py (garbage bytes, any msgpack value, valid requests with one field
replaced). Prints JSON: cases sent, responses by status, 5xx count (must be 0), and health afterwards.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", type=int, default=10_000)
    args = parser.parse_args()

    import httpx
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from protocol import MEDIA_TYPE
    from tests.conftest import ServerProcess
    from tests.test_drills import bodies

    statuses: collections.Counter = collections.Counter()
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess("--model", "compression", "--log-level", "error", log=Path(tmp) / "server.log").wait_ready()
        client = httpx.Client(timeout=10)
        try:
            @settings(max_examples=args.cases, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            @given(body=bodies, content_type=st.sampled_from([MEDIA_TYPE, MEDIA_TYPE, "application/json", ""]))
            def send(body, content_type):
                statuses[client.post(f"{server.url}/v1/score", content=body, headers={"content-type": content_type}).status_code] += 1

            send()
            healthy = server.healthy()
        finally:
            server.stop()
    print(json.dumps({
        "benchmark": "fuzz", "cases": sum(statuses.values()), "by_status": dict(sorted(statuses.items())),
        "server_errors_5xx": sum(n for s, n in statuses.items() if s >= 500), "healthy_after": healthy,
    }))


if __name__ == "__main__":
    main()
