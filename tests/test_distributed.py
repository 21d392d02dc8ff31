"""Two trainer processes under ``accelerate launch`` on CPU (gloo): gathered rewards, synchronised LoRA,
checkpoints written and resumed by both ranks without hanging."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def launch(out: Path, cache: Path, epochs: int, *extra: str, preset: str = "tiny") -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        command(out, cache, epochs, *extra, preset=preset), capture_output=True, text=True, timeout=500, env=env
    )


def command(out: Path, cache: Path, epochs: int, *extra: str, preset: str = "tiny") -> list[str]:
    """``accelerate launch`` of two trainer processes on CPU, small batches, checkpoints every epoch."""
    accelerate = Path(sys.executable).parent / "accelerate"
    return [
        str(accelerate),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "trainer",
        "--preset",
        preset,
        "--run.output_dir",
        str(out),
        "--run.num_epochs",
        str(epochs),
        "--run.save_freq",
        "1",
        "--run.log_with",
        "none",
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
        "--train.per_prompt_stat_tracking",
        "--train.stat_min_count",
        "4",
        *extra,
    ]


def _free_port() -> int:
    from tests.conftest import free_port

    return free_port()


def test_two_processes_train_in_step_and_resume(tmp_path, tiny_cache):
    out = tmp_path / "run"
    first = launch(out, tiny_cache, 2)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "16 samples per epoch on 2 process(es)" in first.stdout
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 1]  # written once, by the main process
    assert all(m["weights_spread_across_processes"] == 0.0 for m in metrics)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 16 and {s["process"] for s in samples} == {0, 1}
    by_rank = [[s["prompt"] for s in samples if s["process"] == r and s["epoch"] == 0] for r in (0, 1)]
    assert by_rank[0] != by_rank[1] and len(by_rank[0]) == len(by_rank[1]) == 8
    assert all(s["reward"] == -s["jpeg_kb"] for s in samples)
    checkpoint = out / "checkpoints" / "checkpoint-2"
    assert {p.name for p in checkpoint.iterdir()} >= {"rng-0.json", "rng-1.json", "trainable.safetensors", "state.json"}
    tracked = json.loads((checkpoint / "state.json").read_text())["tracker"]["buffers"]
    assert sum(len(v) for v in tracked.values()) == len(samples) == 32  # both ranks, both epochs

    resumed = launch(out, tiny_cache, 3, "--run.resume_from", str(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 1, 2] and metrics[-1]["weights_spread_across_processes"] == 0.0
    assert metrics[-1]["global_step"] == 3 * 4


def test_two_processes_train_diffusion_nft_in_step(tmp_path, tiny_cache):
    out = tmp_path / "nft"
    done = launch(out, tiny_cache, 2, "--algorithm", "nft", "--sample.eta", "0", "--train.timestep_fraction", "0.5")
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 1] and all(m["weights_spread_across_processes"] == 0.0 for m in metrics)
    assert metrics[-1]["old_deviation"] > 0 and metrics[-1]["global_step"] == 2 * 4
    assert (out / "checkpoints" / "checkpoint-2" / "old_policy.safetensors").exists()
