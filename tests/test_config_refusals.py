"""Refused at config time, naming the field: bad reward URLs, contradictory settings; the token and a URL's
password never written (config.json, dumps, messages)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError
from pydantic_settings import CliApp

from trainer.config import Config

MASK = "**********"


@pytest.mark.parametrize(
    "url",
    [
        "not-a-url",
        "ftp://x",
        "http://",
        "http://host:8000/v1/score",
        "http://host?x=1",
        "http://host#frag",
        "localhost:8000",
        "http://host:99999",
        "http://my host",
    ],
)
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

    result = subprocess.run(
        [sys.executable, "-m", "trainer", "--reward.url", "not-a-url", "--run.output_dir", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        result.returncode != 0
        and "--reward.url: 'not-a-url' is not a reward server URL" in result.stderr
        and "not-a-url" in result.stderr
    )
    assert not (tmp_path / "o").exists()


def test_per_prompt_stat_tracking_with_groups_is_rejected():
    with pytest.raises(ValidationError, match=r"train.per_prompt_stat_tracking .* sample.images_per_prompt \(2\)"):
        Config(train={"per_prompt_stat_tracking": True}, sample={"batch_size": 4, "images_per_prompt": 2})
    Config(train={"per_prompt_stat_tracking": True})  # one image per prompt: fine
    Config(sample={"batch_size": 4, "images_per_prompt": 2})  # groups alone: fine


def test_norm_guard_on_a_loss_without_a_velocity_and_two_text_encoder_placements_are_rejected():
    with pytest.raises(ValidationError, match=r"train.norm_guard_coef: .* --algorithm nft, awm, dgpo"):
        Config(train={"norm_guard_coef": 0.1})  # ddpo: a log-prob ratio, no velocity loss to add it to
    assert Config(preset="shapes-sd3-nft", train={"norm_guard_coef": 0.1}).train.norm_guard_coef == 0.1
    with pytest.raises(ValidationError, match="run.offload_text_encoders and run.shard_text_encoders"):
        Config(run={"sharding": "fsdp", "shard_text_encoders": True, "offload_text_encoders": True})


def test_unguided_training_of_guided_samples_is_rejected():
    with pytest.raises(ValidationError, match=r"ddpo.cfg is false .* sample.guidance_scale \(5.0\)"):
        Config(ddpo={"cfg": False})
    with pytest.raises(ValidationError, match="sample.guidance_scale"):
        CliApp.run(Config, cli_args=["--no-ddpo.cfg"])
    assert Config(ddpo={"cfg": False}, sample={"guidance_scale": 1.0}).ddpo.cfg is False


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


# -- a password in a reward URL is never written ---------------------------------------------------------------
SECRET_URL = "http://user:s3cretPW@127.0.0.1:8101"


def test_a_password_in_a_reward_url_is_masked_in_every_dump_and_kept_for_requests():
    cfg = Config(reward={"url": [SECRET_URL], "components": [{"scorer": "llava", "url": [SECRET_URL, "http://b:2"]}]})
    assert cfg.reward.url == [SECRET_URL] and cfg.reward.components[0].url == [SECRET_URL, "http://b:2"]  # requests
    assert cfg.reward.sources()[0].url == [SECRET_URL, "http://b:2"]
    for dumped in (cfg.model_dump_json(), json.dumps(cfg.model_dump(mode="json")), str(cfg.model_dump())):
        assert "s3cretPW" not in dumped
    masked = cfg.model_dump(mode="json")["reward"]
    assert masked["url"] == [f"http://user:{MASK}@127.0.0.1:8101"]
    assert masked["components"][0]["url"] == [f"http://user:{MASK}@127.0.0.1:8101", "http://b:2"]


def test_a_masked_url_given_back_is_refused_naming_the_field(tmp_path):
    written = tmp_path / "config.json"
    written.write_text(Config(reward={"url": [SECRET_URL]}).model_dump_json())
    with pytest.raises(ValidationError, match="password .* masked") as raised:
        CliApp.run(Config, cli_args=["--config", str(written)])
    assert raised.value.errors()[0]["loc"] == ("reward", "url")
    again = CliApp.run(Config, cli_args=["--config", str(written), "--reward.url", SECRET_URL])
    assert again.reward.url == [SECRET_URL]


@pytest.mark.parametrize(
    "url", ["http://user:s3cretPW@127.0.0.1:99999", "http://user:s3cretPW@host/v1/score", "ftp://user:s3cretPW@host"]
)
def test_a_bad_url_with_a_password_is_refused_without_printing_it(url):
    with pytest.raises(ValidationError) as raised:
        Config(reward={"url": [url]})
    from protocol.errors import cli_message

    assert "reward server URL" in cli_message(raised.value) and "s3cretPW" not in cli_message(raised.value)
    assert "s3cretPW" not in str(raised.value)  # what --debug's traceback and a Python caller see
    from trainer.config import RewardConfig

    with pytest.raises(ValidationError) as raised:  # as trainer.label and trainer.evaluate build it
        RewardConfig(url=[url])
    assert "s3cretPW" not in str(raised.value)


def test_print_config_and_preflight_messages_mask_the_password(tmp_path):
    import subprocess
    import sys

    from tests.conftest import free_port

    url = f"http://user:s3cretPW@127.0.0.1:{free_port()}"  # nothing listens there
    shown = subprocess.run(
        [sys.executable, "-m", "trainer", "--reward.url", url, "--print-config"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0 and f"user:{MASK}@127.0.0.1" in shown.stdout and "s3cretPW" not in shown.stdout
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer",
            "--preset",
            "tiny",
            "--reward.url",
            url,
            "--reward.probe_timeout",
            "1",
            "--run.output_dir",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and f"--reward.url http://user:{MASK}@127.0.0.1" in run.stderr, run.stderr
    assert "s3cretPW" not in run.stderr + run.stdout


def test_reward_server_errors_and_the_reward_name_mask_the_password():
    from protocol.errors import RewardServerError, redact_url
    from trainer.rewards import RemoteReward

    error = RewardServerError(SECRET_URL, 500, "internal", "boom")
    assert str(error) == f"reward server http://user:{MASK}@127.0.0.1:8101 answered 500 internal: boom"
    assert error.url == SECRET_URL  # the client retries against the real one
    # the last @ ends the userinfo: a path's @ masks too much for a message, never too little
    assert redact_url("https://u:p@w@h:1") == f"https://u:{MASK}@h:1"
    assert redact_url("https://u:p@h:1/x?y=a:b@c") == f"https://u:{MASK}@c"
    assert redact_url("http://h:1/x") == "http://h:1/x" and redact_url("not a url") == "not a url"
    cfg = Config(reward={"url": [SECRET_URL], "probe_timeout": 1})
    reward = RemoteReward(cfg.reward.sources()[0], cfg.reward)
    try:
        assert "s3cretPW" not in reward.name and f"user:{MASK}@" in reward.name
    finally:
        reward.close()


@pytest.mark.parametrize(
    "url, shown",
    [
        ("http://alice:a/PwS3cretXq@127.0.0.1:8121", f"http://alice:{MASK}@127.0.0.1:8121"),
        ("http://alice:a#PwS3cretXq@127.0.0.1:8121", f"http://alice:{MASK}@127.0.0.1:8121"),
        ("http://alice:a?PwS3cretXq@127.0.0.1:8121", f"http://alice:{MASK}@127.0.0.1:8121"),
        ("http://PwS3cretXq@127.0.0.1:8121/x", f"http://{MASK}@127.0.0.1:8121/x"),
    ],
)
def test_a_password_holding_url_delimiters_is_masked_when_the_url_is_refused(url, shown):
    from protocol.errors import cli_message

    with pytest.raises(ValidationError) as raised:
        Config(reward={"url": [url]})
    assert "PwS3cretXq" not in str(raised.value) and "PwS3cretXq" not in cli_message(raised.value)
    assert repr(shown) in str(raised.value)


def test_a_credential_in_the_user_part_alone_is_never_written():
    """config.json and the tracker's hparams are both this dump."""
    url = "http://PwS3cretXq@127.0.0.1:8121"
    cfg = Config(reward={"url": [url]})
    assert cfg.reward.url == [url]  # requests go to the real URL
    dumped = json.dumps(cfg.model_dump(mode="json"))
    assert "PwS3cretXq" not in dumped and f"http://{MASK}@127.0.0.1:8121" in dumped
    with pytest.raises(ValidationError, match="masked"):  # the dump given back would send the mask
        Config(reward={"url": [f"http://{MASK}@127.0.0.1:8121"]})


@pytest.mark.parametrize("url", ["http://alice:pw@127.0.0.1:8121", "http://TOKEN@127.0.0.1:8121"])
def test_url_credentials_and_a_token_together_are_refused(url):
    """A request has one Authorization header: httpx would send the URL's Basic credentials in place of the
    Bearer token. The config says so before anything loads; the client refuses too."""
    from protocol import RewardClient
    from protocol.errors import cli_message

    with pytest.raises(ValidationError) as raised:
        Config(reward={"url": [url], "token": "tok-123"})
    message = cli_message(raised.value)
    assert "reward.token" in message and "credentials" in message and "pw" not in message.replace("password", "")
    with pytest.raises(ValidationError, match="credentials"):
        Config(reward={"components": [{"scorer": "aesthetic", "url": [url]}], "token": "tok-123"})
    with pytest.raises(ValueError, match="credentials"):
        RewardClient(url, token="tok-123")
    Config(reward={"url": [url]})  # either alone is fine
    Config(reward={"url": ["http://127.0.0.1:8121"], "token": "tok-123"})
