"""run.sharding with real processes on CPU (gloo). Two ``accelerate launch`` processes shard the denoiser with
torch's FSDP2 and train what the same run trains unsharded (DDP): LoRA and full finetuning, one algorithm of
each kind (DDPO's rollouts, DiffusionNFT's forward process with lagging weights, ReFL's step loop). A killed
rank stops the run; the sharded checkpoint resumes bit-identically, and on one process; two "machines" of two
processes each (deploy/launch.sh, as a Kubeflow PyTorchJob starts it) train with hybrid sharding, evaluate
on fewer prompts than processes, and resume on two launched by torchrun (c10d rendezvous)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import free_port
from tests.test_distributed import command, launch

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
LORA = "lora/pytorch_lora_weights.safetensors"
SMALL = ("--sample.num_steps", "4", "--sample.batch_size", "4", "--sample.num_batches_per_epoch", "1")
SMALL = (*SMALL, "--train.batch_size", "2", "--no-train.per_prompt_stat_tracking", "--run.save_freq", "1")
DDPO = ("--algorithm", "ddpo", *SMALL)
SHARDED = ("--run.sharding", "fsdp", "--run.shard_text_encoders")  # the denoiser, and the CLIP text encoders
SHARE = r"process (\d): run.sharding (\w+), \d+ units: ([\d,]+) of ([\d,]+) trainable"


def _ran(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def _epochs(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tiny_cache) -> tuple[Path, str]:
    """tiny-sd3, LoRA, DDPO for 2 epochs on 2 sharded processes: its output folder and log."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    return out, _ran(launch(out, tiny_cache, 2, *DDPO, *SHARDED, preset="tiny-sd3"))


def test_sharded_lora_trains_as_unsharded(sharded, tmp_path, tiny_cache):
    out, log = sharded
    shares = re.findall(SHARE, log)
    assert sorted(rank for rank, *_ in shares) == ["0", "1"], log[-2000:]
    mine = [int(m.replace(",", "")) for _, _, m, _ in shares]
    total = int(shares[0][3].replace(",", ""))
    assert sum(mine) == total and max(mine) < total  # each process holds a part, together all of it
    assert "run.shard_text_encoders: text_encoder, text_encoder_2" in log
    checkpoint = out / "checkpoints" / "checkpoint-2"
    assert (checkpoint / "sharded" / ".metadata").is_file() and not (checkpoint / "trainable.safetensors").exists()
    assert "sharded/.metadata" in json.loads((checkpoint / "manifest.json").read_text())["files"]

    # The gathered adapters load in the family's pipeline and change its images.
    from diffusers import StableDiffusion3Pipeline

    from trainer.families.tiny_pipeline import tiny_sd3_path

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_path(tiny_cache), text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=3, height=64, width=64, output_type="np")
    base = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(out / "lora", adapter_name="sharded")
    tuned = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert float(abs(base - tuned).max()) > 0

    whole = tmp_path / "ddp"
    _ran(launch(whole, tiny_cache, 2, *DDPO, preset="tiny-sd3"))
    assert _max_difference(load_file(out / LORA), load_file(whole / LORA)) < 1e-5  # the same updates
    assert [m["reward_mean"] for m in _epochs(out)] == pytest.approx([m["reward_mean"] for m in _epochs(whole)])


def test_a_killed_rank_stops_the_run_and_the_checkpoint_resumes_bit_identically(sharded, tmp_path, tiny_cache):
    reference, _ = sharded
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = command(out, tiny_cache, 4, *DDPO, *SHARDED, preset="tiny-sd3")
    job = subprocess.Popen(started, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    first = out / "checkpoints" / "checkpoint-1"
    deadline = time.monotonic() + 400
    while not first.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first.exists(), "the run wrote no first checkpoint"
    rank_1 = next(p for p in psutil.Process(job.pid).children(recursive=True) if p.environ().get("RANK") == "1")
    rank_1.send_signal(signal.SIGKILL)  # in epoch 2, before its checkpoint
    killed_at = time.monotonic()
    log, _ = job.communicate(timeout=120)
    assert job.returncode != 0 and time.monotonic() - killed_at < 90  # no hang: the others stopped
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s*\n\s*exitcode\s*:\s*-9", log), log[-3000:]

    resumed = tmp_path / "resumed"
    _ran(launch(resumed, tiny_cache, 2, *DDPO, *SHARDED, "--run.resume_from", str(first), preset="tiny-sd3"))
    a, b = load_file(resumed / LORA), load_file(reference / LORA)
    assert all(torch.equal(a[k], b[k]) for k in a)  # epoch 2 again, from the shards: bit for bit


def test_the_sharded_checkpoint_resumes_on_one_process(sharded, tmp_path, tiny_cache):
    out = tmp_path / "run"
    shutil.copytree(sharded[0], out)
    resumed = subprocess.run(
        [sys.executable, "-m", "trainer", "--preset", "tiny-sd3", "--run.output_dir", str(out)]
        + ["--run.num_epochs", "3", "--run.log_with", "none", "--pretrained.cache_dir", str(tiny_cache), *DDPO]
        + ["--train.stat_min_count", "4", *SHARDED, "--run.resume_from", str(out)],  # launch()'s settings
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert "resumed from" in _ran(resumed)
    assert [m["epoch"] for m in _epochs(out)] == [0, 1, 2]
    assert _max_difference(load_file(out / LORA), load_file(sharded[0] / LORA)) > 0  # trained on from the shards


def test_sharded_full_finetune_nft_with_lagging_weights_matches_unsharded(tmp_path, tiny_cache):
    """Full finetuning of tiny-flux with DiffusionNFT rolling out with its lagging weights (swapped in by copy
    on shards) and a KL to the base (a frozen copy, sharded too): the same weights as the unsharded run, saved
    whole and loadable by from_pretrained."""
    from diffusers import FluxTransformer2DModel

    args = ("--algorithm", "nft", "--no-train.lora", "--train.kl_coef", "0.01", *SMALL, "--sample.eta", "0")
    args = (*args, "--nft.old_decay_rate", "0.3", "--nft.old_decay_max", "0.5", "--train.learning_rate", "1e-4")
    out, whole = tmp_path / "fsdp", tmp_path / "ddp"
    _ran(launch(out, tiny_cache, 2, *args, "--run.sharding", "fsdp", preset="tiny-flux"))
    _ran(launch(whole, tiny_cache, 2, *args, preset="tiny-flux"))
    assert _epochs(out)[-1]["old_deviation"] > 0  # the lagging weights differ from the trained ones
    assert _epochs(out)[-1]["kl_to_reference"] == pytest.approx(_epochs(whole)[-1]["kl_to_reference"], rel=1e-4)
    assert _epochs(out)[-1]["kl_to_reference"] > 0

    a = FluxTransformer2DModel.from_pretrained(out / "transformer").state_dict()
    b = FluxTransformer2DModel.from_pretrained(whole / "transformer").state_dict()
    assert _max_difference(a, b) < 1e-5


def test_sharded_refl_step_loop_matches_unsharded(tmp_path, tiny_cache):
    """DRaFT-1 (ReFL's step loop, which DPO shares) on the shipped tiny-shapes-sd3, LoRA, the reward's gradient
    through the decoded image: the same adapters sharded or not. ReFL proper draws its stopping step per
    process; sharded, every process takes rank 0's draw (each forward gathers with all of them)."""
    args = ("--refl.max_train_steps", "2", "--run.eval_every", "0", "--run.log_images_every", "0")
    args = (*args, "--no-train.per_prompt_stat_tracking", "--train.batch_size", "2", "--refl.num_steps", "4")
    draft = (*args, "--refl.mode", "draft", "--refl.draft_k", "1", "--refl.mid_low", "1", "--refl.mid_high", "3")
    out, whole = tmp_path / "fsdp", tmp_path / "ddp"
    log = _ran(launch(out, tiny_cache, 1, *draft, "--run.sharding", "fsdp", preset="shapes-sd3-refl"))
    assert len(re.findall(SHARE, log)) == 2
    _ran(launch(whole, tiny_cache, 1, *draft, preset="shapes-sd3-refl"))
    assert _max_difference(load_file(out / LORA), load_file(whole / LORA)) < 1e-5

    refl = (*args, "--refl.mode", "refl", "--refl.mid_low", "1", "--refl.mid_high", "3", "--run.sharding", "fsdp")
    _ran(launch(tmp_path / "refl", tiny_cache, 1, *refl, preset="shapes-sd3-refl"))  # no collective mismatch


def test_two_machines_of_two_processes_train_with_hybrid_sharding(tmp_path, tiny_cache):
    """deploy/launch.sh on two "machines" (two launchers on 127.0.0.1), told their ranks as a Kubeflow
    PyTorchJob tells its pods: RANK and WORLD_SIZE per pod, which must not become process ranks."""
    out, port = tmp_path / "run", free_port()
    flags = ["--preset", "tiny-sd3", "--run.output_dir", str(out), "--run.num_epochs", "1", "--run.log_with", "none"]
    flags += [
        "--pretrained.cache_dir",
        str(tiny_cache),
        *DDPO,
        "--run.sharding",
        "hybrid",
        "--train.stat_min_count",
        "4",
    ]
    # One evaluation prompt for four processes: the three without one still run the sharded denoiser with it.
    (tmp_path / "one.txt").write_text("a red circle\n")
    flags += ["--run.eval_every", "1", "--prompt.eval_path", str(tmp_path / "one.txt")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}
    env |= {
        "MASTER_PORT": str(port),
        "GPUS_PER_NODE": "2",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    machines = [
        subprocess.Popen(
            [str(REPO / "deploy" / "launch.sh"), *flags],
            env={**env, "RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    logs = [machine.communicate(timeout=600)[0] for machine in machines]
    for machine, log in zip(machines, logs):
        assert machine.returncode == 0, log[-3000:]
    assert "machine 1 of 2, 2 process(es) here" in logs[1]
    assert "16 samples per epoch on 4 process(es)" in logs[0]
    shares = re.findall(SHARE, "".join(logs))
    # replicated across the two machines, sharded within each: every process holds half
    assert sorted(rank for rank, *_ in shares) == ["0", "1", "2", "3"] and {s[1] for s in shares} == {"hybrid"}
    assert all(2 * int(m.replace(",", "")) == int(t.replace(",", "")) for _, _, m, t in shares)
    assert (out / LORA).is_file()
    assert [json.loads(line)["epoch"] for line in (out / "eval.jsonl").read_text().splitlines()] == [0, 1]

    # 4 -> 2: the four processes' shards (weights, AdamW's moments) resharded over two, which train on; the two
    # as two "machines" of one process each, two torchrun launchers meeting at a c10d rendezvous
    four = load_file(out / LORA)
    flags[flags.index("--run.num_epochs") + 1], flags[flags.index("hybrid")] = "2", "fsdp"
    rendezvous = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d"]
    rendezvous += ["--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "resume"]
    torchrun = [str(Path(sys.executable).parent / "torchrun"), *rendezvous, "-m", "trainer", *flags]
    torchrun += ["--run.resume_from", "auto"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    machines = [
        subprocess.Popen(torchrun, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in (0, 1)
    ]
    logs = [machine.communicate(timeout=600)[0] for machine in machines]
    assert all(machine.returncode == 0 for machine in machines), logs[0][-3000:] + logs[1][-3000:]
    log = "".join(logs)
    assert f"resumed from {out / 'checkpoints' / 'checkpoint-1'}" in log and "8 samples per epoch on 2" in log
    assert sorted(rank for rank, *_ in re.findall(SHARE, log)) == ["0", "1"]
    assert [m["epoch"] for m in _epochs(out)] == [0, 1]
    assert _max_difference(load_file(out / LORA), four) > 0


def test_sdxl_trains_sharded(tmp_path, tiny_cache):
    """SDXL's UNet, sharded per down, mid and up block (the family's shard_blocks; SD1's UNet, the same class,
    trains sharded in the Diffusion-DPO test above)."""
    out = tmp_path / "sdxl"
    log = _ran(launch(out, tiny_cache, 1, *DDPO, "--run.sharding", "fsdp", preset="tiny-sdxl"))
    assert sorted((rank, strategy) for rank, strategy, *_ in re.findall(SHARE, log)) == [("0", "fsdp"), ("1", "fsdp")]
    assert "6 units" in log and (out / LORA).is_file()


def test_qwenimage_trains_sharded_with_its_text_encoder(tmp_path, tiny_cache):
    """Qwen-Image's transformer sharded per QwenImageTransformerBlock (2 in tiny-qwenimage, and the root), its
    Qwen2.5-VL text encoder per decoder layer (run.shard_text_encoders, as flow_grpo shards it); the adapters train."""
    from tests.conftest import assert_trained

    out = tmp_path / "qwenimage"
    log = _ran(launch(out, tiny_cache, 1, *DDPO, *SHARDED, preset="tiny-qwenimage"))
    shares = re.findall(SHARE, log)
    assert sorted((rank, strategy) for rank, strategy, *_ in shares) == [("0", "fsdp"), ("1", "fsdp")]
    mine, total = [int(m.replace(",", "")) for *_, m, _ in shares], int(shares[0][3].replace(",", ""))
    assert sum(mine) == total and max(mine) < total
    assert "3 units" in log and "run.shard_text_encoders: text_encoder" in log
    assert_trained(out, [m["loss"] for m in _epochs(out)])


def test_zimage_trains_sharded(tmp_path, tiny_cache):
    """Z-Image's transformer, sharded per ZImageTransformerBlock (the family's shard_blocks: tiny-zimage's noise and
    context refiners' one each and its two main layers, and the root), fed lists of per-image tensors."""
    out = tmp_path / "zimage"
    log = _ran(launch(out, tiny_cache, 1, *DDPO, "--run.sharding", "fsdp", preset="tiny-zimage"))
    assert sorted((rank, strategy) for rank, strategy, *_ in re.findall(SHARE, log)) == [("0", "fsdp"), ("1", "fsdp")]
    assert "5 units" in log and (out / LORA).is_file()


def test_wan22s_two_experts_train_together_sharded(tmp_path, tiny_cache):
    """Wan2.2's two video transformers trained together (pretrained.train_experts both), each sharded per
    WanTransformerBlock (the family's shard_blocks: two per expert, and the root), on video latents (N, 16, f, h,
    w); a chunk of one expert's timesteps leaves the other's adapters without gradients, which FSDP takes and
    DDP does not (refused before any model loads). Both train."""
    from trainer.families.tiny_wan import tiny_wan_path
    from trainer.families.wan import LOW_LORA

    out, model = tmp_path / "wan", str(tiny_wan_path(tiny_cache, experts=2))  # built before the processes load it
    both = ("--pretrained.model", model, "--pretrained.train_experts", "both")
    refused = launch(tmp_path / "ddp", tiny_cache, 2, *DDPO, *both, preset="tiny-wan")
    assert refused.returncode and "pretrained.train_experts: both experts on several processes train sharded" in (
        refused.stdout + refused.stderr
    )
    log = _ran(launch(out, tiny_cache, 2, *DDPO, *both, "--run.sharding", "fsdp", preset="tiny-wan"))
    assert sorted((rank, strategy) for rank, strategy, *_ in re.findall(SHARE, log)) == [("0", "fsdp"), ("1", "fsdp")]
    assert "5 units" in log
    for layers in (load_file(out / LORA), load_file(out / "lora" / LOW_LORA)):
        assert max(float(v.abs().max()) for k, v in layers.items() if "lora_B" in k) > 0  # peft's B starts at 0


def test_sharded_full_finetune_dpo_with_an_ema_reference_matches_unsharded(tmp_path, tiny_cache):
    """Diffusion-DPO fully finetuning SD1's UNet against its moving average (dpo.reference ema): the reference
    is the sharded policy with the average's shards copied in (FSDP gathers from its own storage, so a storage
    swap would go unseen); the reference's errors and the saved UNet are those of the unsharded run."""
    from diffusers import UNet2DConditionModel

    from tests.test_dpo import pick_a_pic_rows
    from trainer.pairs import write_parquet

    write_parquet(pick_a_pic_rows(12), tmp_path / "pairs" / "train-0000.parquet")
    args = ("--algorithm", "dpo", "--dpo.dataset", str(tmp_path / "pairs"), "--dpo.max_train_steps", "2")
    args = (*args, "--no-train.lora", "--train.ema_decay", "0.5", "--dpo.reference", "ema", "--train.batch_size", "1")
    args = (*args, "--train.learning_rate", "1e-4", "--run.eval_every", "0", "--run.log_images_every", "0")
    out, whole = tmp_path / "fsdp", tmp_path / "ddp"
    log = _ran(launch(out, tiny_cache, 1, *args, "--run.sharding", "fsdp"))
    assert len(re.findall(SHARE, log)) == 2
    _ran(launch(whole, tiny_cache, 1, *args))
    (a, b), key = [_epochs(run) for run in (out, whole)], "reference_mse_winner"
    assert len(a) == 2 and [m[key] for m in a] == pytest.approx([m[key] for m in b], rel=1e-5)
    # the loss amplifies float rounding by beta (5000): the reduction orders differ, sharded or not
    assert [m["loss"] for m in a] == pytest.approx([m["loss"] for m in b], rel=2e-3)
    assert a[1]["loss"] != pytest.approx(a[0]["loss"])  # the loss left log 2: the policy moved from its reference

    a = UNet2DConditionModel.from_pretrained(out / "unet").state_dict()
    b = UNet2DConditionModel.from_pretrained(whole / "unet").state_dict()
    assert _max_difference(a, b) < 1e-5
