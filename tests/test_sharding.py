"""run.sharding with real processes on CPU (gloo): two ``accelerate launch`` processes shard the denoiser with
torch's FSDP2 and train what the same run trains unsharded (DDP), LoRA and full finetuning, one algorithm of
each kind; the sharded checkpoint resumes on one process; the saved weights load in the family's pipeline."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_distributed import launch

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SMALL = (
    "--sample.num_steps",
    "4",
    "--sample.batch_size",
    "2",
    "--sample.num_batches_per_epoch",
    "1",
    "--train.batch_size",
    "2",
    "--no-train.per_prompt_stat_tracking",
    "--run.save_freq",
    "1",
)


def _ran(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def _epochs(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_sharded_lora_ddpo_trains_as_unsharded_and_resumes_on_one_process(tmp_path, tiny_cache):
    args = ("--algorithm", "ddpo", *SMALL)
    sharded, whole = tmp_path / "fsdp", tmp_path / "ddp"
    log = _ran(launch(sharded, tiny_cache, 2, *args, "--run.sharding", "fsdp", preset="tiny-sd3"))
    _ran(launch(whole, tiny_cache, 2, *args, preset="tiny-sd3"))

    shares = re.findall(r"process (\d): run.sharding fsdp, \d+ units: ([\d,]+) of ([\d,]+) trainable", log)
    assert sorted(rank for rank, _, _ in shares) == ["0", "1"], log[-2000:]
    mine = [int(m.replace(",", "")) for _, m, _ in shares]
    total = int(shares[0][2].replace(",", ""))
    assert sum(mine) == total and max(mine) < total  # each process holds a part, together all of it
    checkpoint = sharded / "checkpoints" / "checkpoint-2"
    assert (checkpoint / "sharded" / ".metadata").is_file() and not (checkpoint / "trainable.safetensors").exists()

    lora = "lora/pytorch_lora_weights.safetensors"
    a, b = load_file(sharded / lora), load_file(whole / lora)
    assert _max_difference(a, b) < 1e-5  # the same updates, sharded or not
    base = _epochs(whole)
    assert [m["reward_mean"] for m in _epochs(sharded)] == pytest.approx([m["reward_mean"] for m in base], abs=1e-5)

    # The same output directory, resumed by one process: the shards are read back whole.
    resumed = subprocess.run(
        [sys.executable, "-m", "trainer", "--preset", "tiny-sd3", "--run.output_dir", str(sharded)]
        + ["--run.num_epochs", "3", "--run.log_with", "none", "--pretrained.cache_dir", str(tiny_cache), *args]
        + ["--run.sharding", "fsdp", "--run.resume_from", str(sharded)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert "resumed from" in _ran(resumed)
    assert [m["epoch"] for m in _epochs(sharded)] == [0, 1, 2]
    assert _max_difference(load_file(sharded / lora), a) > 0  # it trained on from the shards


def test_sharded_full_finetune_nft_with_lagging_weights_matches_unsharded(tmp_path, tiny_cache):
    """Full finetuning of tiny-flux with DiffusionNFT rolling out with its lagging weights (swapped in by copy
    on shards): the same weights as the unsharded run, saved whole and loadable by from_pretrained."""
    from diffusers import FluxTransformer2DModel

    args = ("--algorithm", "nft", "--no-train.lora", "--nft.old_decay_rate", "0.3", "--nft.old_decay_max", "0.5")
    args = (*args, *SMALL, "--sample.eta", "0", "--train.learning_rate", "1e-4")
    sharded, whole = tmp_path / "fsdp", tmp_path / "ddp"
    _ran(launch(sharded, tiny_cache, 2, *args, "--run.sharding", "fsdp", preset="tiny-flux"))
    _ran(launch(whole, tiny_cache, 2, *args, preset="tiny-flux"))
    assert _epochs(sharded)[-1]["old_deviation"] > 0  # the lagging weights differ from the trained ones

    a = FluxTransformer2DModel.from_pretrained(sharded / "transformer").state_dict()
    b = FluxTransformer2DModel.from_pretrained(whole / "transformer").state_dict()
    assert _max_difference(a, b) < 1e-5
