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
from reward_servers import ScoreOutput, Scorer


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
    from reward_servers.scorer import create_scorer

    assert create_scorer("channel", channel=2).score(IMAGES, [""] * 3, [{}] * 3).scores == pytest.approx([0.0, 0.8, 1.0])
    out = create_scorer("user_rewards:brightness").score(IMAGES, [""] * 3, [{}] * 3)
    assert out.scores == pytest.approx(IMAGES.mean(axis=(1, 2, 3)) / 255) and out.info["first_pixel"] == [0, 51, 255]


@pytest.mark.parametrize("args, message", [
    (["--model", "user_rewards:nope"], "module 'user_rewards' has no 'nope'"),
    (["--model", "no_such_module:fn"], "cannot import module 'no_such_module'"),
    (["--model", "channel", "--options", "chanel=1"], "takes no option chanel (it takes channel)"),
    (["--model", "nonesuch"], "unknown scorer 'nonesuch'; choose one of aesthetic, channel, clipscore"),
])
def test_user_scorer_mistakes_are_start_up_errors(user_package, args, message):
    exe = Path(sys.executable).parent / "reward-server"
    result = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
