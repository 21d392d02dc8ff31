"""Issue 9, trainer side, at config time: bad reward URLs, contradictory settings, the token and config.json."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError
from pydantic_settings import CliApp

from trainer.config import Config

MASK = "**********"


@pytest.mark.parametrize("url", ["not-a-url", "ftp://x", "http://", "http://host:8000/v1/score", "http://host?x=1",
                                 "http://host#frag", "localhost:8000", "http://host:99999", "http://us er@host"])
def test_a_bad_reward_url_fails_in_the_config_naming_the_field(url):
    with pytest.raises(ValidationError, match="reward server URL") as raised:
        Config(reward={"url": [url]})
    assert raised.value.errors()[0]["loc"] == ("reward", "url") and repr(url) in str(raised.value)
    with pytest.raises(ValidationError) as raised:
        Config(reward={"components": [{"scorer": "llava", "url": ["http://ok:1", url]}]})
    assert raised.value.errors()[0]["loc"] == ("reward", "components", 0, "url")


def test_good_reward_urls_are_kept_without_a_trailing_slash():
    cfg = Config(reward={"url": ["http://127.0.0.1:8000", "https://scorer.example.org/", "http://[::1]:9"]})
    assert cfg.reward.url == ["http://127.0.0.1:8000", "https://scorer.example.org", "http://[::1]:9"]


def test_a_bad_reward_url_on_the_command_line_names_the_flag(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "trainer", "--reward.url", "not-a-url", "--run.output_dir", str(tmp_path / "o")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "--reward.url: 'not-a-url' is not a reward server URL" in result.stderr and "not-a-url" in result.stderr
    assert not (tmp_path / "o").exists()


def test_per_prompt_stat_tracking_with_groups_is_rejected():
    with pytest.raises(ValidationError, match=r"train.per_prompt_stat_tracking .* sample.images_per_prompt \(2\)"):
        Config(train={"per_prompt_stat_tracking": True}, sample={"batch_size": 4, "images_per_prompt": 2})
    Config(train={"per_prompt_stat_tracking": True})  # one image per prompt: fine
    Config(sample={"batch_size": 4, "images_per_prompt": 2})  # groups alone: fine


def test_unguided_training_of_guided_samples_is_rejected():
    with pytest.raises(ValidationError, match=r"train.cfg is false .* sample.guidance_scale \(5.0\)"):
        Config(train={"cfg": False})
    with pytest.raises(ValidationError, match="sample.guidance_scale"):
        CliApp.run(Config, cli_args=["--no-train.cfg"])
    assert Config(train={"cfg": False}, sample={"guidance_scale": 1.0}).train.cfg is False


def test_the_mask_of_an_old_config_json_is_not_a_token(tmp_path, monkeypatch):
    monkeypatch.delenv("DIFFUSION_RL_REWARD__TOKEN", raising=False)
    old = tmp_path / "config.json"
    old.write_text(json.dumps({"reward": {"url": ["http://a:1"], "token": MASK}}))
    with pytest.raises(ValidationError, match="reward.token: .*DIFFUSION_RL_REWARD__TOKEN"):
        CliApp.run(Config, cli_args=["--config", str(old)])
    monkeypatch.setenv("DIFFUSION_RL_REWARD__TOKEN", "real-token")  # the environment wins over the mask
    assert CliApp.run(Config, cli_args=["--config", str(old)]).reward.token.get_secret_value() == "real-token"


def test_the_token_is_never_dumped(monkeypatch):
    monkeypatch.setenv("DIFFUSION_RL_REWARD__TOKEN", "real-token")
    cfg = Config(reward={"url": ["http://a:1"]})
    assert cfg.reward.token.get_secret_value() == "real-token"
    for dumped in (cfg.model_dump_json(), json.dumps(cfg.model_dump(mode="json"))):
        assert "token" not in dumped and MASK not in dumped and "real-token" not in dumped
