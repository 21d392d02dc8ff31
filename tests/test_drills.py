"""Reliability drills against real processes: garbage never gets a 5xx, a dying replica costs nothing,
a restarted scorer is waited for, a killed trainer resumes to the same weights, secrets stay secret."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import MEDIA_TYPE, build_request
from tests.conftest import no_model_loads
from trainer.config import Config
from trainer.algorithms.ddpo.loop import train

pytestmark = pytest.mark.timeout(600)

# -- fuzzing ------------------------------------------------------------------------------------------------
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=16)
)
values = st.recursive(
    scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12
)
VALID = msgpack.unpackb(build_request(np.zeros((2, 4, 4, 3), np.uint8), ["a", "b"]))


VALID_GRAD = msgpack.unpackb(
    build_request(np.full((2, 8, 8, 3), 0.5, np.float32), ["a", "b"], encoding="f32", gradient_dtype="float32")
)


def mutated(draw_key, draw_value, valid=VALID):
    """A valid request with one field (top level or inside the first image) replaced by anything."""
    body = json.loads(json.dumps({k: v for k, v in valid.items() if k != "images"}))
    body["images"] = [dict(image) for image in valid["images"]]
    target = body["images"][0] if draw_key.startswith("image.") else body
    target[draw_key.removeprefix("image.")] = draw_value
    return msgpack.packb(body, use_bin_type=True)


bodies = (
    st.binary(max_size=300)
    | values.map(lambda v: msgpack.packb(v, use_bin_type=True))
    | st.builds(
        mutated,
        st.sampled_from(
            [
                "version",
                "request_id",
                "images",
                "prompts",
                "metadata",
                "extra",
                "image.height",
                "image.width",
                "image.channels",
                "image.encoding",
                "image.data",
            ]
        ),
        values,
    )
)


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory):
    from tests.conftest import ServerProcess

    server = ServerProcess(
        "--model", "compression", "--log-level", "error", log=tmp_path_factory.mktemp("fuzz") / "server.log"
    ).wait_ready()
    yield server, httpx.Client(timeout=10)
    server.stop()


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=bodies, content_type=st.sampled_from([MEDIA_TYPE, MEDIA_TYPE, "application/json", ""]))
def test_fuzzed_bodies_never_get_a_5xx(fuzz_target, body, content_type):
    server, client = fuzz_target
    response = client.post(f"{server.url}/v1/score", content=body, headers={"content-type": content_type})
    assert response.status_code < 500, (response.status_code, response.content[:300])
    if response.status_code != 200:
        error = msgpack.unpackb(response.content)["error"]
        assert error["code"] and error["message"]


def test_still_healthy_after_fuzzing(fuzz_target):
    server, _ = fuzz_target
    assert server.healthy() and server.metric("reward_requests_total", status="500") == 0


FIELDS = [
    "version",
    "request_id",
    "images",
    "prompts",
    "metadata",
    "extra",
    "gradient_dtype",
    "image.height",
    "image.width",
    "image.channels",
    "image.encoding",
    "image.data",
]
grad_bodies = (
    st.binary(max_size=300)
    | values.map(lambda v: msgpack.packb(v, use_bin_type=True))
    | st.builds(lambda key, value: mutated(key, value, VALID_GRAD), st.sampled_from(FIELDS), values)
    # well-formed float images of any values: NaN, infinities and out-of-range pixels are the client's error
    | st.builds(
        lambda pixels: build_request(
            np.array(pixels, np.float32).reshape(1, 4, 4, 3), ["a"], encoding="f32", gradient_dtype="float16"
        ),
        st.lists(st.floats(width=32), min_size=48, max_size=48)
        | st.lists(st.floats(0, 1, width=32), min_size=48, max_size=48),
    )
)


@pytest.fixture(scope="module")
def grad_target(tmp_path_factory):
    from tests.conftest import ServerProcess

    server = ServerProcess(
        "--model",
        "aesthetic",
        "--checkpoint",
        "tiny-shapes",
        "--log-level",
        "error",
        log=tmp_path_factory.mktemp("fuzz-grad") / "server.log",
    ).wait_ready()
    yield server, httpx.Client(timeout=30)
    server.stop()


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=grad_bodies)
def test_fuzzed_score_grad_bodies_never_get_a_5xx(grad_target, body):
    """/v1/score_grad on a differentiable scorer: a 200 carries one score and one finite gradient per image,
    anything else is a 4xx naming what was wrong."""
    server, client = grad_target
    response = client.post(f"{server.url}/v1/score_grad", content=body, headers={"content-type": MEDIA_TYPE})
    assert response.status_code < 500, (response.status_code, response.content[:300])
    reply = msgpack.unpackb(response.content)
    if response.status_code == 200:
        n = len(msgpack.unpackb(body)["images"])
        assert len(reply["scores"]) == n and len(reply["gradients"]) == n
    else:
        assert reply["error"]["code"] and reply["error"]["message"]


def test_still_healthy_after_fuzzing_score_grad(grad_target):
    server, _ = grad_target
    assert server.healthy() and server.metric("reward_requests_total", status="500") == 0


# -- trainer against failing scorers ------------------------------------------------------------------------
def drill_config(tmp_path, tiny_cache, urls, epochs=3, **reward) -> Config:
    return Config(
        run={"output_dir": tmp_path / "run", "num_epochs": epochs, "log_with": "none", "log_images_every": 0},
        pretrained={"cache_dir": tiny_cache},
        sample={"num_steps": 4, "batch_size": 4, "num_batches_per_epoch": 3},
        train={"batch_size": 2},
        reward={"url": urls, "scorer": "synthetic", "retries": 30, "deadline": 120, **reward},
    )


def run_in_thread(cfg: Config, seen: list) -> threading.Thread:
    def hook(epoch, batches):
        seen.extend((b["images"], b["rewards"]["synthetic"]) for b in batches)

    thread = threading.Thread(target=lambda: seen.append(("history", train(cfg, image_samples_hook=hook))))
    thread.start()
    return thread


def wait_for_requests(server, n: int = 1, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while server.metric("reward_requests_total", status="200") < n:
        assert time.monotonic() < deadline, "the trainer never reached the scorer"
        time.sleep(0.05)


def check_every_sample_scored_once(cfg: Config, seen: list, epochs: int) -> None:
    history = next(item[1] for item in seen if isinstance(item[0], str))
    assert [m["epoch"] for m in history] == list(range(epochs))
    batches = [item for item in seen if not isinstance(item[0], str)]
    assert len(batches) == epochs * cfg.sample.num_batches_per_epoch
    for images, rewards in batches:  # each image's reward is its own (the synthetic score is its brightness)
        np.testing.assert_allclose(rewards, images.mean(axis=(1, 2, 3)) / 255, rtol=1e-12)
    samples = (cfg.run.output_dir / "samples.jsonl").read_text().splitlines()
    assert len(samples) == epochs * 12


def test_a_replica_killed_mid_epoch_costs_nothing(tmp_path, tiny_cache, start_server):
    a = start_server("--model", "synthetic", "--latency-ms", "150")
    b = start_server("--model", "synthetic", "--latency-ms", "150")
    cfg = drill_config(tmp_path, tiny_cache, [a.url, b.url])
    seen: list = []
    thread = run_in_thread(cfg, seen)
    wait_for_requests(a)
    a.proc.send_signal(signal.SIGKILL)
    thread.join(timeout=300)
    check_every_sample_scored_once(cfg, seen, 3)
    assert b.metric("reward_requests_total", status="200") > 0


def test_a_restarted_scorer_is_waited_for(tmp_path, tiny_cache, start_server):
    server = start_server("--model", "synthetic", "--latency-ms", "100")
    cfg = drill_config(tmp_path, tiny_cache, [server.url])
    seen: list = []
    thread = run_in_thread(cfg, seen)
    wait_for_requests(server)
    server.proc.send_signal(signal.SIGKILL)
    time.sleep(2.0)  # the trainer keeps sampling and its client keeps retrying
    restarted = start_server("--model", "synthetic", "--latency-ms", "100", port=server.port)
    thread.join(timeout=300)
    check_every_sample_scored_once(cfg, seen, 3)
    assert restarted.metric("reward_requests_total", status="200") > 0


# -- a killed trainer ---------------------------------------------------------------------------------------
def trainer(out, cache, *extra) -> subprocess.Popen:
    args = [
        sys.executable,
        "-m",
        "trainer",
        "--preset",
        "tiny",
        "--run.output_dir",
        str(out),
        "--run.num_epochs",
        "4",
        "--run.save_freq",
        "1",
        "--run.log_with",
        "none",
        "--run.log_images_every",
        "0",
        "--pretrained.cache_dir",
        str(cache),
        "--sample.num_steps",
        "4",
        "--sample.batch_size",
        "4",
        "--sample.num_batches_per_epoch",
        "2",
        "--train.batch_size",
        "2",
        *extra,
    ]
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )


def test_a_trainer_killed_mid_epoch_resumes_to_the_same_weights(tmp_path, tiny_cache):
    from safetensors.torch import load_file

    straight = trainer(tmp_path / "straight", tiny_cache)
    killed = trainer(tmp_path / "killed", tiny_cache)
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.monotonic() + 300
    while not (checkpoints / "checkpoint-2").exists():
        assert time.monotonic() < deadline and killed.poll() is None, killed.stdout.read().decode()[-2000:]
        time.sleep(0.02)
    time.sleep(0.3)  # into epoch 3
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert straight.wait(timeout=300) == 0
    # A half-written checkpoint, as a kill during a save leaves it, must be ignored.
    (checkpoints / ".staging-checkpoint-3").mkdir(exist_ok=True)
    (checkpoints / ".staging-checkpoint-3" / "trainable.safetensors").write_bytes(b"partial")
    resumed = trainer(tmp_path / "killed", tiny_cache, "--run.resume_from", str(tmp_path / "killed"))
    output = resumed.communicate(timeout=300)[0].decode()
    assert resumed.returncode == 0, output[-2000:]
    assert "resumed from" in output and "checkpoint-2" in output
    one = load_file(tmp_path / "straight" / "lora" / "pytorch_lora_weights.safetensors")
    two = load_file(tmp_path / "killed" / "lora" / "pytorch_lora_weights.safetensors")
    assert one.keys() == two.keys() and all((one[k] == two[k]).all() for k in one)


# -- secrets ------------------------------------------------------------------------------------------------
def test_the_token_works_and_is_never_written(tmp_path, tiny_cache, start_server, monkeypatch):
    token = "drill-token-0123456789"
    server = start_server("--model", "synthetic", "--log-level", "debug", env={"REWARD_SERVER_TOKEN": token})
    monkeypatch.setenv("DIFFUSION_RL_REWARD__TOKEN", token)
    cfg = drill_config(tmp_path, tiny_cache, [server.url], epochs=1)
    assert cfg.reward.token.get_secret_value() == token
    train(cfg)
    written = "".join(
        p.read_text(errors="replace") for p in cfg.run.output_dir.rglob("*") if p.suffix in (".json", ".jsonl")
    )
    assert token not in written and "**********" not in written  # not even masked: the mask would be sent back
    assert "token" not in json.loads((cfg.run.output_dir / "config.json").read_text())["reward"]
    monkeypatch.setenv("DIFFUSION_RL_REWARD__TOKEN", "wrong")
    from trainer.preflight import PreflightError

    with no_model_loads(), pytest.raises(PreflightError, match="refuses the token given"):
        train(drill_config(tmp_path / "wrong", tiny_cache, [server.url], epochs=1))
    server.stop()
    assert token not in server.log.read_text()


def test_schemathesis_on_the_json_endpoints(fuzz_target, tmp_path):
    """The OpenAPI spec's JSON endpoints, fuzzed against their documented schemas and status codes.
    (POST /v1/score is msgpack, which schemathesis cannot serialise: the hypothesis drill above covers it.)"""
    server, _ = fuzz_target
    exe = os.path.join(os.path.dirname(sys.executable), "schemathesis")
    result = subprocess.run(
        [
            exe,
            "run",
            f"{server.url}/openapi.json",
            "--checks",
            "all",
            "--include-method",
            "GET",
            "--max-examples",
            "50",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # its .schemathesis/ cache stays out of the repo
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert "No issues found" in result.stdout
