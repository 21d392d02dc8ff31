"""deploy/: the compose file read and checked with our own parsers, then its topology run for real as local
processes (tiny models, 127.0.0.1) with the trainer using the compose deployment's reward configuration."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import yaml
from pydantic_settings import CliApp

from reward_servers.cli import ServerSettings
from tests.conftest import assert_trained
from trainer.config import Config

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
SCORERS = ("llava", "aesthetic", "compression")


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def gpu_ids(service: dict) -> list[str]:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    return [i for d in devices if d.get("driver") == "nvidia" for i in d["device_ids"]]


def trainer_args(command: list[str]) -> list[str]:
    args = command[command.index("trainer") + 1 :]
    return [str(DEPLOY / "trainer.toml") if a == "/app/deploy/trainer.toml" else a for a in args]


def test_every_command_is_accepted_by_our_parsers(compose):
    services = compose["services"]
    assert set(services) == {"trainer", *SCORERS}
    for name in SCORERS:
        command = services[name]["command"]
        assert command[0] == "reward-server"
        settings = CliApp.run(ServerSettings, cli_args=command[1:])
        assert settings.model == name and settings.host == "0.0.0.0" and settings.port == 8000
        if settings.gpus:  # inside the container the reserved GPUs are renumbered from 0
            assert len(settings.gpus.split(",")) == len(gpu_ids(services[name]))
    command = services["trainer"]["command"]
    assert command[:3] == ["accelerate", "launch", "--multi_gpu"]
    assert int(command[command.index("--num_processes") + 1]) == len(gpu_ids(services["trainer"]))
    cfg = CliApp.run(Config, cli_args=trainer_args(command))
    # every reward URL is a scorer service of this file, by name
    assert {c.scorer: c.url for c in cfg.reward.sources()} == {name: [f"http://{name}:8000"] for name in SCORERS}


def test_gpus_do_not_overlap_and_scorers_are_healthchecked(compose):
    services = compose["services"]
    taken = [gpu for service in services.values() for gpu in gpu_ids(service)]
    assert len(taken) == len(set(taken)), f"a GPU is reserved twice: {taken}"
    assert gpu_ids(services["llava"]) == ["6", "7"]
    for name in SCORERS:
        check = " ".join(services[name]["healthcheck"]["test"])
        assert "/readyz" in check and "8000" in check
        assert services["trainer"]["depends_on"][name] == {"condition": "service_healthy"}
        assert services[name]["environment"]["REWARD_SERVER_TOKEN"].startswith("${REWARD_TOKEN")
    assert services["trainer"]["environment"]["DIFFUSION_RL_REWARD__TOKEN"].startswith("${REWARD_TOKEN")
    assert {"model-cache", "outputs"} <= set(compose["volumes"])
    env_example = (DEPLOY / ".env.example").read_text()
    assert "REWARD_TOKEN=" in env_example


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_topology_runs_as_local_processes(start_server, tmp_path, tiny_cache, monkeypatch):
    """The same services, tiny models on 127.0.0.1, the same token and reward configuration."""
    from trainer.algorithms.ddpo.loop import train

    token = "topology-test-token"
    env = {"REWARD_SERVER_TOKEN": token}
    servers = {
        "llava": start_server(
            "--model",
            "llava",
            "--checkpoint",
            "tiny",
            "--bertscore-model",
            "tiny",
            "--max-new-tokens",
            "4",
            env=env,
            wait=False,
        ),
        "aesthetic": start_server("--model", "aesthetic", "--checkpoint", "tiny", env=env, wait=False),
        "compression": start_server("--model", "compression", env=env, wait=False),
    }
    for server in servers.values():
        server.wait_ready(180)
    deployed = tomllib.loads((DEPLOY / "trainer.toml").read_text())
    for component in deployed["reward"]["components"]:
        component["url"] = [servers[u.split("//")[1].split(":")[0]].url for u in component["url"]]
    monkeypatch.setenv("DIFFUSION_RL_REWARD__TOKEN", token)
    cfg = Config(
        preset="tiny",
        run={"output_dir": tmp_path / "run", "num_epochs": 2, "log_with": "none"},
        pretrained={"cache_dir": tiny_cache},
        sample={"num_steps": 4, "batch_size": 4, "num_batches_per_epoch": 2},
        train={"batch_size": 2},
        reward=deployed["reward"],
    )
    history = train(cfg)
    assert [m["epoch"] for m in history] == [0, 1]
    for name in SCORERS:
        assert servers[name].metric("reward_images_total", status="200") == 2 * 8
        assert f"reward_{name.replace('llava', 'alignment')}_mean" in history[-1]
    assert_trained(cfg.run.output_dir, [m["loss"] for m in history])


def test_tool_caches_are_not_part_of_the_repository():
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(
        ["git", "ls-files", ".schemathesis", ".hypothesis"], cwd=root, capture_output=True, text=True
    )
    assert tracked.stdout == ""
    ignored = subprocess.run(["git", "check-ignore", "-q", ".schemathesis/cache"], cwd=root)
    assert ignored.returncode == 0
