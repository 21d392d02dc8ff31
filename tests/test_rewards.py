"""The trainer's reward sources: in-process output checked like a server's, reward servers probed at start."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tests.conftest import free_port
from trainer.config import Config, RewardConfig
from trainer.preflight import PreflightError, check
from trainer.rewards import LocalReward, Rewards


def test_an_in_process_nan_stops_the_run_instead_of_reaching_the_advantages():
    from scorers.scorer import create_scorer

    reward = LocalReward("synthetic", create_scorer("synthetic", nan_prompt="bad"))
    images = np.full((3, 8, 8, 3), 51, np.uint8)
    assert reward.submit(images, ["a", "b", "c"], [{}] * 3).result(timeout=30).scores == pytest.approx([0.2] * 3)
    with pytest.raises(ValueError, match="scores.1: score nan is not finite"):
        reward.submit(images, ["a", "bad", "c"], [{}] * 3).result(timeout=30)
    reward.close()


def test_an_unreachable_reward_server_is_found_before_any_model_loads(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = Config(
        run={"output_dir": tmp_path / "run", "log_with": "none"},
        pretrained={"cache_dir": tmp_path / "cache"},
        reward={"url": [dead], "probe_timeout": 1.0},
    )
    from trainer.algorithms.ddpo.loop import train

    start = time.monotonic()
    with pytest.raises(PreflightError, match=f"(?s)--reward.url {dead}: unreachable .*fix --reward.url"):
        train(cfg)
    assert time.monotonic() - start < 30
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir()), "a model was loaded first"


def test_one_replica_down_is_a_warning_while_another_is_ready(compression_server, caplog):
    dead = f"http://127.0.0.1:{free_port()}"
    check(Config(reward={"url": [dead, compression_server.url], "probe_timeout": 1.0}), 1, "cpu")
    assert "using the other replicas" in caplog.text and dead in caplog.text
    rewards = Rewards(RewardConfig(url=[dead, compression_server.url]))
    scores = rewards.submit(np.zeros((2, 8, 8, 3), np.uint8), ["a", "b"], [{}, {}])["compression"].result(timeout=30)
    assert len(scores.scores) == 2
    rewards.close()
