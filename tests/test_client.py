"""RewardClient's retry policy: 4xx at once, connection errors and 5xx retried. Against real servers, except the
``test_unit_*`` items: answers a real server never sends on cue (a 429, a NaN score), given by an in-process
transport, to test the policy's decisions alone."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from protocol import RewardClient, RewardServerError, pack

IMAGES = np.zeros((2, 16, 16, 3), np.uint8)


def test_4xx_raises_at_once_with_the_servers_message(compression_server):
    client = RewardClient(compression_server.url, retries=5, deadline=60)
    before = compression_server.metric("reward_requests_total", status="422")
    with pytest.raises(RewardServerError) as err:
        client.submit(IMAGES, ["only one prompt"]).result(timeout=30)
    assert compression_server.metric("reward_requests_total", status="422") == before + 1  # asked once, not retried
    assert err.value.status == 422 and err.value.field == "prompts" and "has 1 entries for 2 images" in str(err.value)
    client.close()


def test_connection_errors_are_retried_until_the_server_comes_up(start_server):
    from tests.conftest import free_port

    port = free_port()
    client = RewardClient(f"http://127.0.0.1:{port}", retries=50, deadline=60, max_backoff=0.5)
    future = client.submit(IMAGES, ["a", "b"])
    time.sleep(1.0)
    assert not future.done()
    start_server("--model", "compression", port=port)
    assert len(future.result(timeout=60).scores) == 2
    client.close()


def test_failover_to_the_next_url(compression_server):
    from tests.conftest import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    with RewardClient([dead, compression_server.url], retries=3, deadline=30, max_backoff=0.1) as client:
        for _ in range(3):
            assert len(client.submit(IMAGES, ["a", "b"]).result(timeout=30).scores) == 2


def test_gives_up_at_the_deadline():
    from tests.conftest import free_port

    with RewardClient(f"http://127.0.0.1:{free_port()}", retries=1000, deadline=1.5, max_backoff=0.2) as client:
        start = time.monotonic()
        with pytest.raises(httpx.ConnectError):
            client.submit(IMAGES, ["a", "b"]).result(timeout=30)
        assert 1.0 < time.monotonic() - start < 6


def _reply(scores: list[float]) -> httpx.Response:
    return httpx.Response(
        200,
        content=pack({"version": 1, "request_id": "r", "scores": scores, "info": {}, "scorer": "t", "elapsed_ms": 1.0}),
    )


def _error(status: int, code: str) -> httpx.Response:
    body = pack({"version": 1, "error": {"code": code, "message": "from the test", "field": None}})
    return httpx.Response(status, content=body, headers={"retry-after": "0"})


def _score_through(answers: list[httpx.Response]) -> tuple[object, int]:
    """Unit test of the retry policy alone: an in-process transport gives ``answers`` in turn; returns the
    outcome (a reply or the exception) and how many requests were made."""
    given = iter(answers)
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return next(given)

    client = RewardClient("http://scorer.invalid", retries=5, deadline=30, max_backoff=0.05)

    async def run():
        client._http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        client._http_loop = asyncio.get_running_loop()
        return await client.score(IMAGES, ["a", "b"])

    try:
        return asyncio.run(run()), len(calls)
    except RewardServerError as exc:
        return exc, len(calls)


def test_unit_503_and_429_retried_then_succeed():
    outcome, calls = _score_through([_error(503, "overloaded"), _error(429, "busy"), _reply([1.0, 2.0])])
    assert outcome.scores == [1.0, 2.0] and calls == 3


@pytest.mark.parametrize(
    "answer, expected",
    [
        (_error(500, "scorer_error"), "500 scorer_error"),
        (_error(500, "internal"), "500 internal"),
        (_reply([1.0, float("nan")]), "502 bad_reply.*not finite"),  # fails check_scores: the same on every replica
    ],
)
def test_unit_a_scorer_error_or_bad_reply_is_final(answer, expected):
    outcome, calls = _score_through([answer, _reply([1.0, 2.0])])
    assert isinstance(outcome, RewardServerError) and calls == 1
    assert re.search(expected, str(outcome))


def test_submit_from_many_threads(compression_server):
    with RewardClient(compression_server.url) as client:
        results = [None] * 8

        def work(i):
            results[i] = client.submit(np.full((1, 8, 8, 3), i * 30, np.uint8), [str(i)]).result(timeout=30)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert all(len(r.scores) == 1 for r in results)


def test_many_threads_submitting_first_share_one_loop(compression_server):
    """The background loop starts once however many threads race to be first."""
    for _ in range(5):
        client = RewardClient(compression_server.url)
        gate = threading.Barrier(16)
        results, errors = [], []

        def work(i):
            gate.wait()
            try:
                results.append(client.submit(np.full((1, 8, 8, 3), i, np.uint8), [str(i)]).result(timeout=30))
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        loops = [t for t in threading.enumerate() if t.name == "reward-client"]
        client.close()
        assert not errors and len(results) == 16 and len(loops) == 1, (errors[:1], len(loops))
        assert not [t for t in threading.enumerate() if t.name == "reward-client"]


def test_close_with_requests_in_flight_cancels_them_quietly(start_server):
    import subprocess
    import sys

    # A close that waited would take the rest of the scorer's 6 s; the requests are in the model when it is called.
    server = start_server("--model", "synthetic", "--latency-ms", "6000")
    script = f"""
import numpy as np, time
from protocol import RewardClient
from tests.conftest import metric
client = RewardClient("{server.url}")
futures = [client.submit(np.zeros((1, 8, 8, 3), np.uint8), ["p"]) for _ in range(3)]
while metric("{server.url}", "reward_replicas_busy") != 1:
    time.sleep(0.01)
start = time.monotonic()
client.close()
assert time.monotonic() - start < 3, "close waited for the scorer"
assert all(f.cancelled() for f in futures), [f for f in futures]
"""
    root = Path(__file__).parents[1]  # for tests.conftest
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Task was destroyed" not in result.stderr and "never retrieved" not in result.stderr, result.stderr
    server.proc.kill()  # not drained: its scorer would sleep 6 s more per batch for requests nobody waits for


# -- one server's status: protocol.client.ready and info (trainer/preflight.py asks them) -----------------------
def test_ready_and_info_of_a_real_server(compression_server):
    from protocol.client import info, ready

    ready(compression_server.url)  # 200: returns
    found = info(compression_server.url)
    assert found["scorer"] == "compression" and found["auth"] is False and found["authorized"] is None
    assert found["limits"]["max_body_bytes"] == 1 << 20  # --max-body-mb 1
    with pytest.raises(RewardServerError) as err:  # not a reward server's /v1/info: named, never read as one
        info(f"{compression_server.url}/elsewhere")
    assert err.value.status == 404 and "Not Found" in str(err.value)


def test_info_sends_the_token_as_scoring_does(start_server):
    from protocol.client import info

    server = start_server("--model", "synthetic", env={"REWARD_SERVER_TOKEN": "right-token"})
    assert info(server.url)["auth"] is True and info(server.url)["authorized"] is None
    assert info(server.url, "right-token")["authorized"] is True
    assert info(server.url, "wrong-token")["authorized"] is False
    with pytest.raises(ValueError, match="URL credentials and a bearer token together"):
        info(server.url.replace("://", "://user:pw@"), "right-token")


def test_ready_says_draining_and_unreachable(start_server):
    import signal

    from protocol.client import info, ready
    from protocol.errors import Unreachable
    from tests.conftest import free_port

    dead = f"http://user:s3cret@127.0.0.1:{free_port()}"
    for call in (ready, info):
        with pytest.raises(Unreachable) as err:
            call(dead, timeout=2)
        assert (
            err.value.reason.startswith("ConnectError: ") and err.value.url == dead and "s3cret" not in str(err.value)
        )
    server = start_server("--model", "compression", "--drain-delay-s", "3")
    server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 2  # of the 3 s the server keeps answering
    while True:
        try:
            ready(server.url)
        except RewardServerError as exc:
            assert exc.status == 503 and exc.retryable and '"draining":true' in exc.message, exc
            break
        assert time.monotonic() < deadline, "/readyz still 200 2 s after SIGTERM"
    assert server.proc.wait(timeout=30) in (0, -signal.SIGTERM)
