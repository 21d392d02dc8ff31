"""Your own reward and prompt functions: named as module:function, registered by entry point, served by
reward-server or run in process, with the same code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from protocol import RewardClient

USER_REWARDS = '''
import numpy as np
from scorers import ScoreOutput, Scorer


def brightness(images, prompts, metadata):
    """Mean brightness in [0, 1]."""
    scores = images.mean(axis=(1, 2, 3)) / 255
    return scores, {"first_pixel": [int(im[0, 0, 0]) for im in images]}


class Channel(Scorer):
    name = "channel"
    description = "mean of one colour channel"

    def __init__(self, channel: int = 0):
        self.channel = int(channel)

    def score(self, images, prompts, metadata):
        return ScoreOutput(images[..., self.channel].mean(axis=(1, 2)) / 255)
'''


@pytest.fixture
def user_package(tmp_path, monkeypatch) -> Path:
    """A module of the user's, and an installed distribution that registers its scorer by entry point."""
    (tmp_path / "user_rewards.py").write_text(USER_REWARDS)
    dist = tmp_path / "user_rewards-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: user-rewards\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[diffusion_rl.scorers]\nchannel = user_rewards:Channel\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # for the reward-server subprocesses
    return tmp_path


IMAGES = np.stack([np.full((8, 8, 3), v, np.uint8) for v in (0, 51, 255)])
IMAGES[1, ..., 2] = 204


def test_reward_server_serves_a_users_function(user_package, start_server):
    server = start_server("--model", "user_rewards:brightness")
    with RewardClient(server.url) as client:
        reply = client.submit(IMAGES, ["a", "b", "c"]).result(timeout=30)
    assert reply.scores == pytest.approx(IMAGES.mean(axis=(1, 2, 3)) / 255)
    assert reply.info == {"first_pixel": [0, 51, 255]} and reply.scorer == "user_rewards:brightness"
    import httpx

    assert httpx.get(f"{server.url}/v1/info").json()["description"] == "Mean brightness in [0, 1]."


def test_a_scorer_registered_by_entry_point_is_served_by_name_with_its_options(user_package, start_server):
    server = start_server("--model", "channel", "--options", "channel=2")
    with RewardClient(server.url) as client:
        reply = client.submit(IMAGES, ["a", "b", "c"]).result(timeout=30)
    assert reply.scores == pytest.approx([0.0, 0.8, 1.0]) and reply.scorer == "channel"


def test_the_same_code_runs_in_process(user_package):
    from scorers.scorer import create_scorer

    assert create_scorer("channel", channel=2).score(IMAGES, [""] * 3, [{}] * 3).scores == pytest.approx(
        [0.0, 0.8, 1.0]
    )
    out = create_scorer("user_rewards:brightness").score(IMAGES, [""] * 3, [{}] * 3)
    assert out.scores == pytest.approx(IMAGES.mean(axis=(1, 2, 3)) / 255) and out.info["first_pixel"] == [0, 51, 255]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "user_rewards:nope"], "module 'user_rewards' has no 'nope'"),
        (["--model", "no_such_module:fn"], "cannot import module 'no_such_module'"),
        (["--model", "channel", "--options", "chanel=1"], "takes no option chanel (it takes channel)"),
        (["--model", "nonesuch"], "unknown scorer 'nonesuch'; choose one of aesthetic, channel, clipscore"),
    ],
)
def test_user_scorer_mistakes_are_start_up_errors(user_package, args, message):
    exe = Path(sys.executable).parent / "reward-server"
    result = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]


# -- the Python API and the command line, end to end --------------------------------------------------------
def _small(tmp_path, tiny_cache, **reward):
    from trainer.config import Config

    return Config(
        run={"output_dir": tmp_path / "run", "num_epochs": 1, "log_with": "none", "log_images_every": 0},
        pretrained={"cache_dir": tiny_cache},
        sample={"num_steps": 3, "batch_size": 4, "num_batches_per_epoch": 2},
        train={"batch_size": 2},
        reward=reward,
    )


@pytest.mark.slow
def test_reward_and_prompt_functions_from_python(tmp_path, tiny_cache):
    import json

    from scorers.scorer import torch_images
    from trainer.algorithms.ddpo.loop import train

    seen = {}

    def brightness(images, prompts, metadata):
        seen["numpy"] = (images.dtype, images.shape, metadata[0])
        return images.mean(axis=(1, 2, 3)) / 255, {"tag": [m["animal"] for m in metadata]}

    @torch_images
    def redness(images, prompts, metadata):  # TRL's signature: a float tensor in [0, 1], NCHW
        seen["torch"] = (str(images.dtype), tuple(images.shape), float(images.min()), float(images.max()))
        return images[:, 0].mean(dim=(1, 2)), {}

    def animal(rng):
        name = ["cat", "dog", "owl"][rng.integers(3)]
        return f"a photo of a {name}", {"animal": name}

    cfg = _small(tmp_path, tiny_cache, components=[{"name": "redness", "scorer": "compression", "weight": 0.5}])
    history = train(cfg, reward_fn={"brightness": brightness, "redness": redness}, prompt_fn=animal)
    assert seen["numpy"][0] == np.uint8 and seen["numpy"][1] == (4, 64, 64, 3) and "animal" in seen["numpy"][2]
    assert seen["torch"][:2] == ("torch.float32", (4, 3, 64, 64)) and 0 <= seen["torch"][2] <= seen["torch"][3] <= 1
    m = history[0]
    # redness keeps its configured weight 0.5 (its scorer is the function now); brightness joins with weight 1
    assert m["reward_mean"] == pytest.approx(m["reward_brightness_mean"] + 0.5 * m["reward_redness_mean"], rel=1e-6)
    samples = [json.loads(line) for line in (cfg.run.output_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and all(s["prompt"] == f"a photo of a {s['brightness/tag']}" for s in samples)


@pytest.mark.slow
def test_reward_and_prompt_functions_by_name_on_the_command_line(user_package, tmp_path, tiny_cache):
    import json
    import os

    (user_package / "user_prompts.py").write_text("def animal():\n    return 'a photo of an owl'\n")
    out = tmp_path / "cli"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer",
            "--preset",
            "tiny",
            "--reward.scorer",
            "user_rewards:brightness",
            "--prompt.fn",
            "user_prompts:animal",
            "--run.output_dir",
            str(out),
            "--run.num_epochs",
            "1",
            "--run.log_with",
            "none",
            "--pretrained.cache_dir",
            str(tiny_cache),
            "--sample.num_steps",
            "3",
            "--sample.batch_size",
            "4",
            "--sample.num_batches_per_epoch",
            "1",
            "--train.batch_size",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples] == ["a photo of an owl"] * 4 and all("first_pixel" in s for s in samples)


@pytest.mark.slow
def test_the_readme_example_runs_as_written(tmp_path, tiny_cache):
    import os
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"<!-- example: my_rewards.py.*?-->\n```python\n(.*?)```", readme, re.S).group(1)
    assert 15 <= len(code.strip().splitlines()) <= 30
    (tmp_path / "my_rewards.py").write_text(code)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DIFFUSION_RL_PRETRAINED__CACHE_DIR": str(tiny_cache),
        "DIFFUSION_RL_RUN__LOG_WITH": "none",
    }
    result = subprocess.run(
        [sys.executable, "my_rewards.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"reward 0\.\d{4} -> 0\.\d{4}", result.stdout), result.stdout[-500:]
    import json

    samples = [json.loads(line) for line in (tmp_path / "outputs/brightness/samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 * 8 and all(
        s["prompt"].startswith("a photo of a ") and 0 <= s["red"] <= 255 for s in samples
    )
