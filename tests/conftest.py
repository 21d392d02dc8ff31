from __future__ import annotations

import contextlib
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

# Oversubscribed intra-op threads made tiny models ~80x slower on 2-core machines.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """One tiny pipeline build per test session (or the user's cache when DIFFUSION_RL_CACHE is set)."""
    return Path(os.environ.get("DIFFUSION_RL_CACHE") or tmp_path_factory.mktemp("cache"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(url: str, name: str, **labels: str) -> float:
    """One sample of a reward server's /metrics (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


class ServerProcess:
    """A real ``reward-server`` subprocess on 127.0.0.1."""

    def __init__(self, *args: str, port: int | None = None, log: Path, env: dict[str, str] | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        exe = shutil.which("reward-server", path=str(Path(sys.executable).parent)) or "reward-server"
        self.log = log
        self.proc = subprocess.Popen(
            [exe, *args, "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"],
            stdout=open(log, "wb"),
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    def wait_ready(self, timeout: float = 60.0) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"reward-server exited {self.proc.returncode}: {self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"reward-server not ready after {timeout} s: {self.log.read_text()}")

    def metric(self, name: str, **labels: str) -> float:
        return metric(self.url, name, **labels)

    def wait_metric(self, name: str, value: float, timeout: float = 60.0, **labels: str) -> None:
        """Poll /metrics until ``name`` reads ``value``: an event to order a test by, where a sleep guesses."""
        deadline = time.monotonic() + timeout
        while self.metric(name, **labels) != value:
            assert time.monotonic() < deadline, f"{name} never read {value}: {self.log.read_text()[-2000:]}"
            time.sleep(0.01)

    def healthy(self) -> bool:
        return httpx.get(f"{self.url}/healthz", timeout=5).json() == {"status": "ok"}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture
def start_server(tmp_path):
    servers: list[ServerProcess] = []

    def start(
        *args: str, port: int | None = None, wait: bool = True, env: dict[str, str] | None = None
    ) -> ServerProcess:
        server = ServerProcess(*args, port=port, log=tmp_path / f"server-{len(servers)}.log", env=env)
        servers.append(server)
        return server.wait_ready() if wait else server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def compression_server(tmp_path_factory):
    server = ServerProcess(
        "--model", "compression", "--max-body-mb", "1", log=tmp_path_factory.mktemp("srv") / "server.log"
    ).wait_ready()
    yield server
    server.stop()


def train_one_shapes_epoch(tmp_path: Path, preset: str) -> tuple[Path, list[dict]]:
    """One small epoch of a shapes-world preset evaluated before and after on four captions (two each), its
    output folder and its eval.jsonl records."""
    import json

    from trainer.config import Config
    from trainer.algorithms.ddpo.loop import train

    held_out = tmp_path / "held_out.txt"
    held_out.write_text("a triangle\nthree circles\na red triangle\na circle above a square\n" * 2)
    out = tmp_path / "run"
    train(
        Config(
            preset=preset,
            run={"output_dir": out, "num_epochs": 1, "eval_every": 1, "log_with": "none", "log_images_every": 0},
            sample={"num_steps": 4, "batch_size": 4, "num_batches_per_epoch": 1},
            train={"batch_size": 2},
            prompt={"eval_path": held_out},
        )
    )
    return out, [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]


def assert_trained(out: Path, losses: list[float]) -> None:
    """What "trains" means in a test: every loss finite and the trainable weights moved. peft's gaussian init
    starts each LoRA B matrix at zero, so a nonzero one in the run's published lora/ is an optimizer step that
    reached the adapters; rewards in a verifier's own [0, 1] hold just as well for a model that never changed."""
    import torch
    from safetensors.torch import load_file

    assert losses and all(math.isfinite(loss) for loss in losses), losses
    weights = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    moved = [k for k, w in weights.items() if "lora_B" in k and w.abs().max() > 0]
    assert moved, "every LoRA B matrix is still zero: the weights never moved"


class ModelLoaded(AssertionError):
    """Raised by ``no_model_loads``: something loaded a model that should have been refused first."""


@contextlib.contextmanager
def no_model_loads():
    """Inside the block the trainer's model loader (trainer.run.load_family) and diffusers' from_pretrained raise
    ModelLoaded. "Refused before any model loads" is then proved by the refusal being the error raised; a time
    limit proves nothing once the tiny model is cached (loading it takes a second)."""
    import diffusers

    def refuse(*args, **kwargs):
        raise ModelLoaded("a model was loaded before the refusal")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("trainer.run.load_family", refuse)
        patch.setattr(diffusers.DiffusionPipeline, "from_pretrained", classmethod(refuse))
        patch.setattr(diffusers.ModelMixin, "from_pretrained", classmethod(refuse))
        yield
