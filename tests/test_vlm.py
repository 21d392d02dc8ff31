"""The VLM judge (scorers/vlm.py) against a real stand-in OpenAI-compatible server (tests/vlm_standin.py), whose
judgement is the shapes verifier's: every mode's numbers, every injected fault met without losing a sample,
the failure policies, the API key kept out of everything written, and the judge hosted by reward-server."""

from __future__ import annotations

import subprocess
import sys
import time
from itertools import combinations
from pathlib import Path

import httpx
import numpy as np
import pytest

from protocol import MEDIA_TYPE, RewardClient, build_request, unpack
from scorers import world
from scorers.scorer import create_scorer
from scorers.shapes import verify
from scorers.vlm import JudgeError, group_pairs
from tests.conftest import free_port

pytestmark = pytest.mark.timeout(120)
MODEL = "standin-judge"
CAPTIONS = ["a red circle", "a blue square", "three triangles"]


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    """The stand-in judge as a subprocess on 127.0.0.1, shared by the module; faults reset per test."""
    port = free_port()
    log = tmp_path_factory.mktemp("standin") / "standin.log"
    script = Path(__file__).with_name("vlm_standin.py")
    proc = subprocess.Popen(
        [sys.executable, str(script), "--port", str(port), "--model", MODEL], stdout=open(log, "wb"), stderr=-2
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        try:
            if httpx.get(f"{url}/v1/models", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def faults(url: str, *queued: str, slow_s: float = 2.0) -> None:
    httpx.post(f"{url}/_faults", json={"faults": list(queued), "slow_s": slow_s}, timeout=5).raise_for_status()


def stats(url: str) -> dict:
    return httpx.get(f"{url}/_stats", timeout=5).json()


def batch():
    """Three groups of three: two renders of the group's caption and one of the next caption's."""
    images, prompts = [], []
    for i, caption in enumerate(CAPTIONS):
        for k in range(3):
            images.append(world.render(caption if k < 2 else CAPTIONS[(i + 1) % 3], 10 * i + k))
            prompts.append(caption)
    truth = np.array([verify(im, world.claims(p))[0] for im, p in zip(images, prompts)])
    return np.stack(images), prompts, truth


def scorer(url: str, **options):
    s = create_scorer("vlm", base_url=f"{url}/v1", model=MODEL, resolution=128, backoff=0.01, **options)
    s.load()
    return s


def win_rates(truth: np.ndarray, prompts: list[str]) -> np.ndarray:
    """Pref-GRPO's reward, written out again: within each prompt, every pair; the better image wins 1, a tie
    0.5 each; reward = wins / comparisons."""
    wins, played = np.zeros(len(truth)), np.zeros(len(truth))
    for i, j in combinations(range(len(truth)), 2):
        if prompts[i] == prompts[j]:
            wins[i] += 1.0 if truth[i] > truth[j] else 0.5 if truth[i] == truth[j] else 0.0
            wins[j] += 1.0 if truth[j] > truth[i] else 0.5 if truth[i] == truth[j] else 0.0
            played[i] += 1
            played[j] += 1
    return wins / played


def test_each_mode_scores_what_the_verifier_sees_and_caches_by_content(judge):
    faults(judge)
    images, prompts, truth = batch()
    assert sorted(set(truth)) == [0.0, 1.0]  # the batch holds right and wrong images
    metadata = [{}] * len(prompts)
    expected = {
        "yesno": 0.02 + 0.96 * truth,  # the stand-in's P(Yes), spread over Yes / " yes" / YES: summed back
        "pointwise": (1 + 4 * truth) / 5,  # "Final Score: 1 + 4 t", divided by 5
        "pairwise": win_rates(truth, prompts),
    }
    for mode, wanted in expected.items():
        out = scorer(judge, mode=mode).score(images, prompts, metadata)
        np.testing.assert_allclose(out.scores, wanted, atol=1e-6, err_msg=mode)
        assert out.info["dropped"] == [0] * 9 and out.info["reasked"] == [0] * 9, mode
    assert stats(judge)["judged"] == 9 + 9 + 9  # 3 groups of 3: 3 pairs each
    s = scorer(judge, mode="yesno", image_format="jpeg")
    first = s.score(images, prompts, metadata)
    again = s.score(images, prompts, metadata)  # same content: answered from the cache
    assert stats(judge)["judged"] == 27 + 9 and again.info["reply"] == ["(cached)"] * 9
    np.testing.assert_allclose(again.scores, first.scores)


def test_every_fault_is_met_and_nothing_is_lost(judge):
    images, prompts, truth = batch()
    faults(judge, "429", "500", "close", "slow", "notjson", "garbage", slow_s=3.0)
    s = scorer(judge, mode="pointwise", timeout=1.0, retries=4, concurrency=1)
    out = s.score(images, prompts, [{}] * 9)
    np.testing.assert_allclose(out.scores, (1 + 4 * truth) / 5, atol=1e-6)  # every image judged honestly
    seen = stats(judge)
    assert {k: seen.get(f"fault_{k}") for k in ("429", "500", "close", "slow", "notjson", "garbage")} == dict.fromkeys(
        ("429", "500", "close", "slow", "notjson", "garbage"), 1
    )
    assert seen["judged"] == 9 and seen["requests"] == 9 + 6
    # transport faults are retried inside one ask; the two unreadable 200s are asked again
    assert sum(out.info["reasked"]) == 2 and sum(out.info["failed_calls"]) == 0 and sum(out.info["dropped"]) == 0


def test_unreadable_replies_past_the_reasks_are_dropped_or_stop_the_run(judge):
    images, prompts, truth = batch()
    faults(judge, "garbage", "garbage", "garbage")  # the first image's three asks (concurrency 1: in order)
    out = scorer(judge, mode="yesno", reasks=2, concurrency=1).score(images, prompts, [{}] * 9)
    assert out.info["dropped"] == [1] + [0] * 8 and out.info["reasked"][:2] == [2, 0]
    assert "rather talk about the weather" in out.info["reply"][0]
    p_yes = 0.02 + 0.96 * truth
    np.testing.assert_allclose(out.scores[1:], p_yes[1:], atol=1e-6)
    assert out.scores[0] == pytest.approx(p_yes[1:3].mean())  # a stand-in: its group's others, never a 0
    faults(judge, "garbage", "garbage", "garbage")
    with pytest.raises(JudgeError, match=r"image 0 \('a red circle'\).*rather talk about the weather"):
        scorer(judge, mode="yesno", reasks=2, concurrency=1, on_failure="stop").score(images, prompts, [{}] * 9)


def test_a_call_failing_past_its_retries_is_counted_and_dropped_or_stops(judge):
    images, prompts, truth = batch()
    faults(judge, *["500"] * 4)  # retries 1 (two calls per ask) x reasks 1 (two asks): all of image 0's
    out = scorer(judge, mode="pointwise", retries=1, reasks=1, concurrency=1).score(images, prompts, [{}] * 9)
    assert (out.info["failed_calls"][0], out.info["reasked"][0], out.info["dropped"][0]) == (2, 1, 1)
    assert sum(out.info["dropped"]) == 1 and stats(judge)["requests"] == 4 + 9 - 1
    np.testing.assert_allclose(out.scores[1:], (1 + 4 * truth[1:]) / 5, atol=1e-6)
    faults(judge, *["500"] * 4)
    with pytest.raises(JudgeError, match="failed 2 times; last: HTTP 500: .*injected 500"):
        scorer(judge, retries=1, reasks=1, concurrency=1, on_failure="stop").score(images, prompts, [{}] * 9)


def test_pairwise_drops_an_image_only_when_none_of_its_pairs_was_judged(judge):
    images, prompts, truth = batch()
    faults(judge, "garbage", "garbage")  # pair (0, 1) of the first group, asked twice: no verdict
    out = scorer(judge, mode="pairwise", reasks=1, concurrency=1).score(images, prompts, [{}] * 9)
    assert out.info["comparisons"][:3] == [1, 1, 2] and out.info["dropped"] == [0] * 9
    assert out.info["reasked"][0] == 1
    # image 0 and 1 each met only image 2 (a wrong render): both won it
    np.testing.assert_allclose(out.scores[:3], [1.0, 1.0, 0.0])
    assert group_pairs([4, 5, 6, 7], 1) == [(4, 5), (4, 7), (5, 6), (6, 7)]


def test_a_wrong_model_is_named_by_preflight_and_never_retried(judge, monkeypatch):
    faults(judge)
    wrong = create_scorer("vlm", base_url=f"{judge}/v1", model="UnifiedReward", backoff=0.01)
    assert wrong.problems() == {"model": f"{judge}/v1 serves '{MODEL}', not 'UnifiedReward'"}
    with pytest.raises(ValueError, match=f"model: {judge}/v1 serves '{MODEL}', not 'UnifiedReward'"):
        wrong.load()
    moved = scorer(judge)
    moved.model = "UnifiedReward"  # as if the judge had been restarted with another model after load
    images, prompts, _ = batch()
    with pytest.raises(JudgeError, match="answered HTTP 404: .*The model `UnifiedReward` does not exist"):
        moved.score(images[:1], prompts[:1], [{}])
    assert stats(judge)["requests"] == 1  # a 4xx is not asked again
    dead = create_scorer("vlm", base_url=f"http://127.0.0.1:{free_port()}/v1", model=MODEL)
    assert "ConnectError" in dead.problems()["base_url"]


def test_the_api_key_comes_from_the_environment_and_is_never_shown(judge, monkeypatch):
    secret = "sk-test-0123456789"
    s = create_scorer("vlm", base_url=f"{judge}/v1", model=MODEL, api_key_env="JUDGE_KEY")
    assert s.problems() == {"api_key_env": "the environment variable JUDGE_KEY is not set (or empty)"}
    monkeypatch.setenv("JUDGE_KEY", secret)
    assert s.problems() == {}
    s.load()
    assert s.client.http.headers["authorization"] == f"Bearer {secret}"
    with pytest.raises(ValueError, match="must be the NAME of an environment variable") as refused:
        create_scorer("vlm", model=MODEL, api_key_env=secret.replace("-", "/"))
    assert "0123456789" not in str(refused.value)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"mode": "likert"}, "mode: choose one of pointwise, yesno, pairwise"),
        ({"model": ""}, "model: name the judge model"),
        ({"base_url": "127.0.0.1:8000"}, "base_url: expected http(s)://host"),
        ({"pattern": "Final Score"}, "pattern: 'Final Score' needs a group"),
        ({"template": "judge {caption}"}, "template: only {prompt}"),
        ({"concurrency": "0"}, "concurrency: must be at least 1"),
        ({"on_failure": "zero"}, "on_failure: choose drop or stop"),
    ],
)
def test_bad_options_name_their_field(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        create_scorer("vlm", **{"model": MODEL, **options})


def test_reward_server_hosts_the_judge(judge, start_server):
    faults(judge, "429", "close")
    images, prompts, truth = batch()
    server = start_server(
        "--model", "vlm", "--mode", "pairwise", "--options", f"base_url={judge}/v1", "--options", f"model={MODEL}",
        "--options", "backoff=0.01", "--max-batch", "64",
    )  # fmt: skip
    with RewardClient(server.url) as client:
        out = client.submit(images, prompts).result(timeout=60)
    np.testing.assert_allclose(out.scores, win_rates(truth, prompts), atol=1e-6)
    assert out.info["dropped"] == [0] * 9 and stats(judge)["judged"] == 9
    bad = httpx.post(  # one image of a prompt cannot be compared: a 422 naming it, and the server serves on
        f"{server.url}/v1/score",
        content=build_request(images[:3], [prompts[0], prompts[3], prompts[0]]),
        headers={"content-type": MEDIA_TYPE},
        timeout=30,
    )
    error = unpack(bad.content)["error"]
    assert (bad.status_code, error["field"]) == (422, "prompts.1") and "at least 2 images" in error["message"]
    with RewardClient(server.url) as client:
        assert client.submit(images[:2], prompts[:2]).result(timeout=60).scores == [0.5, 0.5]


def test_reward_server_refuses_to_start_with_a_model_the_judge_does_not_serve(judge, start_server):
    server = start_server("--model", "vlm", "--options", f"base_url={judge}/v1", "--options", "model=nope", wait=False)
    assert server.proc.wait(timeout=60) != 0
    assert f"model: {judge}/v1 serves '{MODEL}', not 'nope'" in server.log.read_text()
