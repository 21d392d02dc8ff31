"""The trainer end to end: 2 epochs in-process and against a live reward server; the LoRA loads in diffusers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import assert_trained
from trainer.config import Config
from trainer.plan import BatchPlan
from trainer.algorithms.ddpo.loop import train

pytestmark = pytest.mark.slow


def small_config(tmp_path, tiny_cache, **reward) -> Config:
    return Config(
        run={"output_dir": tmp_path / "run", "num_epochs": 2, "log_with": "tensorboard"},
        pretrained={"cache_dir": tiny_cache},
        sample={"num_steps": 4, "batch_size": 4, "num_batches_per_epoch": 2},
        train={"batch_size": 2, "gradient_accumulation_steps": 2},
        reward=reward,
    )


def check_run(cfg: Config, history: list[dict]) -> None:
    out = cfg.run.output_dir
    assert [m["epoch"] for m in history] == [0, 1]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines == history
    for m in history:
        assert -20 < m["reward_mean"] < 0 and m["reward_std"] > 0  # minus JPEG kB of 64 px images
        # an epoch's first optimizer step moves the policy off the sampler's, so the second's ratios are not 1
        assert m["approx_kl"] > 0
    assert_trained(out, [m["loss"] for m in history])
    # 2 batches x 4 samples / (2 x 2 accumulation) = 2 optimizer steps per epoch
    assert history[-1]["global_step"] == 4
    assert Config.model_validate_json((out / "config.json").read_text()) == cfg
    last = history[-1]["epoch"]  # every log_images_every epochs, and the final epoch always
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted({"epoch-0000.png", f"epoch-{last:04d}.png"})
    assert list(out.glob("events.out.tfevents.*")), "tensorboard events written into the run folder itself"
    assert not [p for p in out.iterdir() if p.is_dir() and p.name not in ("images", "checkpoints", "lora", "unet")]


def load_with_diffusers(cfg: Config):
    from diffusers import StableDiffusionPipeline

    from trainer.families.tiny_pipeline import tiny_pipeline_path

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_path(cfg.pretrained.cache_dir), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    base = pipe("a cat", num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(cfg.run.output_dir / "lora", adapter_name="ddpo")
    tuned = pipe("a cat", num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0)).images
    return pipe, base, tuned


def test_in_process_run_saves_a_lora_diffusers_loads(tmp_path, tiny_cache):
    cfg = small_config(tmp_path, tiny_cache)
    history = train(cfg)
    check_run(cfg, history)
    from safetensors.torch import load_file

    weights = load_file(cfg.run.output_dir / "lora" / "pytorch_lora_weights.safetensors")
    assert weights and all(k.startswith("unet.") and "module." not in k for k in weights)
    assert any(".conv1." in k for k in weights) and any(".to_q." in k for k in weights)
    pipe, base, tuned = load_with_diffusers(cfg)
    from peft.utils import get_peft_model_state_dict

    loaded = get_peft_model_state_dict(pipe.unet, adapter_name="ddpo")
    assert len(loaded) == len(weights)  # every adapter arrived, attention and conv alike
    for key, value in weights.items():
        assert torch.equal(loaded[key.removeprefix("unet.")], value), key
    assert np.abs(base - tuned).max() > 0  # the trained adapters change the images


def test_remote_run_against_a_live_reward_server(tmp_path, tiny_cache, compression_server):
    cfg = small_config(tmp_path, tiny_cache, url=[compression_server.url], encoding="png")
    history = train(cfg)
    check_run(cfg, history)


def test_same_seed_same_rewards_local_and_remote(tmp_path, tiny_cache, compression_server):
    local = small_config(tmp_path / "a", tiny_cache)
    remote = small_config(tmp_path / "b", tiny_cache, url=[compression_server.url])
    local.run.num_epochs = remote.run.num_epochs = 1
    a, b = train(local), train(remote)
    assert a[0]["reward_mean"] == pytest.approx(b[0]["reward_mean"], abs=1e-12)


def test_bad_config_fails_before_any_model_loads(tmp_path):
    # The model path does not exist: the error must be about the batch sizes, found first.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer",
            "--pretrained.model",
            str(tmp_path / "missing"),
            "--sample.batch_size",
            "6",
            "--train.batch_size",
            "4",
            "--run.output_dir",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "sample.batch_size (6) must be a multiple of train.batch_size (4)" in result.stderr
    assert not (tmp_path / "o").exists()

    result = subprocess.run(
        [sys.executable, "-m", "trainer", "--train.learning_rate", "-1"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0 and "train.learning_rate" in result.stderr

    if not torch.cuda.is_available():  # half weights without autocast would fail deep inside the UNet
        result = subprocess.run(
            [sys.executable, "-m", "trainer", "--run.mixed_precision", "fp16", "--run.output_dir", str(tmp_path / "h")],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode != 0 and "run.mixed_precision: fp16 needs a GPU" in result.stderr


def test_batch_plan_arithmetic():
    cfg = Config(
        sample={"batch_size": 8, "num_batches_per_epoch": 4, "num_steps": 50},
        train={"batch_size": 4, "gradient_accumulation_steps": 2, "timestep_fraction": 0.5},
    )
    plan = BatchPlan.of(cfg, num_processes=8)
    assert (
        plan.samples_per_epoch,
        plan.effective_train_batch,
        plan.optimizer_steps_per_epoch,
        plan.train_timesteps,
    ) == (256, 64, 4, 25)
    with pytest.raises(ValueError, match=r"= 24 must be a multiple of .* = 32"):
        BatchPlan.of(
            Config(
                sample={"batch_size": 4, "num_batches_per_epoch": 3},
                train={"batch_size": 4, "gradient_accumulation_steps": 4},
            ),
            2,
        )


def test_dotted_cli_overrides():
    from pydantic_settings import CliApp

    cfg = CliApp.run(
        Config,
        cli_args=[
            "--train.learning_rate",
            "3e-4",
            "--reward.url",
            "http://a:1",
            "--reward.url",
            "http://b:2",
            "--no-ddpo.cfg",
            "--sample.guidance_scale",
            "1",
        ],
    )
    assert cfg.train.learning_rate == 3e-4 and cfg.reward.url == ["http://a:1", "http://b:2"] and cfg.ddpo.cfg is False


def test_a_failing_scorer_stops_the_run_naming_it(tmp_path, tiny_cache, start_server):
    from trainer.rewards import RewardError

    server = start_server("--model", "synthetic", "--oom-above", "0")  # every batch fails
    cfg = small_config(tmp_path, tiny_cache, url=[server.url], scorer="synthetic", retries=1, deadline=30)
    cfg.sample.num_batches_per_epoch = 50  # the run must stop long before sampling all of these
    with pytest.raises(
        RewardError, match=rf"reward scorer synthetic \(reward server {server.url}\) failed: .*500 scorer_error"
    ):
        train(cfg)
    assert server.metric("reward_requests_total", status="500") < 10
    assert not (cfg.run.output_dir / "metrics.jsonl").exists()


def test_resume_is_exact(tmp_path, tiny_cache):
    from safetensors.torch import load_file

    def run(out, epochs, resume=None, **train_options):
        cfg = small_config(tmp_path, tiny_cache)
        cfg.run.output_dir, cfg.run.num_epochs, cfg.run.resume_from, cfg.run.save_freq = out, epochs, resume, 1
        cfg.train.per_prompt_stat_tracking, cfg.train.stat_min_count = True, 2
        # a warm-up that crosses the resume point (step 4 of 8); its length does not depend on num_epochs
        cfg.train.lr_scheduler, cfg.train.lr_warmup_steps = "constant_with_warmup", 6
        return train(cfg)

    straight = run(tmp_path / "straight", 4)
    run(tmp_path / "split", 2)
    # a half-written checkpoint (killed mid-save) is never picked up
    (tmp_path / "split" / "checkpoints" / ".staging-checkpoint-3").mkdir()
    resumed = run(tmp_path / "split", 4, resume=tmp_path / "split")
    assert [m["epoch"] for m in resumed] == [2, 3]
    for a, b in zip(straight[2:], resumed):
        assert a["reward_mean"] == b["reward_mean"] and a["global_step"] == b["global_step"]
        assert a["learning_rate"] == b["learning_rate"]
    lrs = [m["learning_rate"] / Config().train.learning_rate for m in straight]  # read after 2, 4, 6, 8 optimizer steps
    assert lrs == pytest.approx([2 / 6, 4 / 6, 1.0, 1.0])
    final = lambda run: load_file(tmp_path / run / "lora" / "pytorch_lora_weights.safetensors")  # noqa: E731
    one, two = final("straight"), final("split")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    kept = sorted(p.name for p in (tmp_path / "split" / "checkpoints").glob("checkpoint-*"))
    assert kept == ["checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-4"]
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2, 3]


def test_a_cold_model_cache_does_not_change_a_seeded_run(tmp_path):
    runs = []
    for name in ("cold", "warm"):  # the first builds the tiny pipeline into the empty cache, the second loads it
        cfg = small_config(tmp_path / name, tmp_path / "fresh-cache")
        cfg.run.num_epochs = 1
        runs.append(train(cfg)[0])
    assert runs[0]["reward_mean"] == runs[1]["reward_mean"] and runs[0]["loss"] == runs[1]["loss"]


def test_weighted_rewards_local_and_remote(tmp_path, tiny_cache, start_server):
    """Two components, one in-process and one on a server, each every batch; the sum is weighted and normalised."""
    server = start_server("--model", "synthetic")
    cfg = small_config(
        tmp_path,
        tiny_cache,
        components=[
            {"scorer": "compression", "weight": 2.0, "normalize": True},
            {"scorer": "synthetic", "name": "brightness", "url": [server.url], "weight": -0.5},
        ],
    )
    cfg.run.num_epochs = 1
    metrics = train(cfg)[0]
    samples = [json.loads(line) for line in (cfg.run.output_dir / "samples.jsonl").read_text().splitlines()]
    jpeg = np.array([s["compression"] for s in samples])
    bright = np.array([s["brightness"] for s in samples])
    assert all(s["compression/jpeg_kb"] == -s["compression"] for s in samples)
    assert all(s["brightness/batch_size"] >= 1 for s in samples)
    expected = 2.0 * (jpeg - jpeg.mean()) / (jpeg.std() + 1e-8) - 0.5 * bright
    assert [s["reward"] for s in samples] == pytest.approx(expected.tolist())
    assert metrics["reward_mean"] == pytest.approx(expected.mean())
    assert metrics["reward_compression_mean"] == pytest.approx(jpeg.mean())
    assert metrics["reward_brightness_mean"] == pytest.approx(bright.mean()) and 0 < bright.mean() < 1
    assert server.metric("reward_images_total", status="200") == len(samples)  # every image, once


def test_kl_penalty_ema_and_gradient_checkpointing(tmp_path, tiny_cache, monkeypatch):
    from safetensors.torch import load_file

    def run(name, **train_options):
        cfg = small_config(tmp_path / name, tiny_cache)
        cfg.run.num_epochs = 1
        cfg = Config.model_validate({**cfg.model_dump(), "train": {**cfg.train.model_dump(), **train_options}})
        return cfg, train(cfg)[0]

    # diffusers' checkpointed blocks call torch.utils.checkpoint.checkpoint, looked up at each call: counting
    # those calls tells a run that recomputes activations from one that only matches its loss
    calls = {"checkpoint": 0}
    checkpoint = torch.utils.checkpoint.checkpoint

    def counted(*args, **kwargs):
        calls["checkpoint"] += 1
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counted)
    _, plain = run("plain")
    assert calls["checkpoint"] == 0
    _, checkpointed = run("checkpointed", gradient_checkpointing=True)
    assert calls["checkpoint"] > 0
    assert checkpointed["reward_mean"] == plain["reward_mean"]
    assert checkpointed["loss"] == pytest.approx(plain["loss"], rel=1e-4, abs=1e-7)  # same math, recomputed

    cfg, kl = run("kl", kl_coef=0.1, ema_decay=0.5)
    assert kl["kl_to_reference"] > 0  # the adapters moved the policy away from the base model
    online = load_file(cfg.run.output_dir / "checkpoints" / "checkpoint-1" / "trainable.safetensors")
    published = load_file(cfg.run.output_dir / "lora" / "pytorch_lora_weights.safetensors")
    lora_b = [k for k in online if "lora_B" in k]
    assert any(not torch.equal(online[k], published["unet." + k.replace(".default", "")]) for k in lora_b)  # EMA


def test_full_finetuning_keeps_a_frozen_base_for_the_kl(tmp_path, tiny_cache):
    """train.kl_coef without LoRA: the KL's reference is a frozen copy of the denoiser as loaded. It stays the
    base while the denoiser trains, and the KL to it grows from 0."""
    from trainer import run as run_setup

    cfg = small_config(tmp_path, tiny_cache)
    cfg = Config.model_validate(
        {**cfg.model_dump(), "train": {**cfg.train.model_dump(), "lora": False, "kl_coef": 0.1}}
    )
    with run_setup.started(cfg, 1) as run:
        trained = run_setup.load_model(run, 1)
        base = {name: p.detach().clone() for name, p in trained.policy.named_parameters()}
        assert all(torch.equal(p.float(), base[name]) for name, p in trained.frozen.named_parameters())
        assert not any(p.requires_grad for p in trained.frozen.parameters())
        loss = sum(p.float().pow(2).sum() for p in trained.trainable.values())  # any step moves every weight
        run_setup.backward_and_step(run, trained, loss, {"grad_norm": []})
        assert not all(torch.equal(p, base[name]) for name, p in trained.policy.named_parameters())
        assert all(torch.equal(p.float(), base[name]) for name, p in trained.frozen.named_parameters())
        with trained.base() as reference:
            assert reference is trained.frozen
    cfg.run.num_epochs, cfg.run.output_dir = 1, tmp_path / "run"
    assert train(cfg)[0]["kl_to_reference"] > 0


def test_ema_update_math():
    from trainer.ema import EMA

    p = {"w": torch.tensor([0.0, 10.0])}
    ema = EMA(p, decay=0.75)
    p["w"] = torch.tensor([4.0, 2.0])
    ema.update(p)
    assert ema.shadow["w"].tolist() == [1.0, 8.0]  # 0.75 * old + 0.25 * new


def test_knobs_that_cannot_work_fail_in_the_config():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="use_8bit_adam: needs `pip install bitsandbytes` and a CUDA GPU"):
        Config(train={"use_8bit_adam": True})


def test_grouped_sampling(tmp_path, tiny_cache):
    cfg = small_config(tmp_path, tiny_cache)
    # groups of 8 span the epoch's two batches of 4 (Flow-GRPO's groups of 24 span batches of 9)
    cfg = Config.model_validate({**cfg.model_dump(), "sample": {**cfg.sample.model_dump(), "images_per_prompt": 8}})
    cfg.run.num_epochs = 1
    train(cfg)
    records = [json.loads(line) for line in (cfg.run.output_dir / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 8 and len({r["prompt"] for r in records}) == 1
    from pydantic import ValidationError

    with pytest.raises(
        ValidationError,
        match=r"images_per_prompt: 3 must divide a process's samples per epoch, "
        r"sample.batch_size x sample.num_batches_per_epoch = 8",
    ):
        Config(sample={"batch_size": 4, "num_batches_per_epoch": 2, "images_per_prompt": 3})


def test_image_samples_hook_grid_and_histograms(tmp_path, tiny_cache):
    import io

    from PIL import Image

    calls = []
    cfg = small_config(tmp_path, tiny_cache)
    cfg.run.num_epochs, cfg.run.log_images_every = 2, 1
    train(cfg, image_samples_hook=lambda epoch, batches: calls.append((epoch, batches)))
    assert [epoch for epoch, _ in calls] == [0, 1] and all(len(batches) == 2 for _, batches in calls)
    for _, batches in calls:
        for batch in batches:
            assert batch["images"].shape == (4, 64, 64, 3) and len(batch["prompts"]) == 4
            for image, reward in zip(batch["images"], batch["rewards"]["compression"]):
                buf = io.BytesIO()
                Image.fromarray(image).save(buf, format="JPEG", quality=95)
                assert reward == pytest.approx(-len(buf.getvalue()) / 1000)
    sheet = Image.open(cfg.run.output_dir / "images" / "epoch-0001.png")
    assert sheet.size[0] == 4 * 192 and sheet.size[1] > 192  # 64 px enlarged 3x, captions wrapped under
    events = list(cfg.run.output_dir.glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent), size_guidance={"images": 0, "histograms": 0, "tensors": 0}).Reload()
    assert "reward/compression" in acc.Tags()["histograms"] and "samples" in acc.Tags()["images"]
    table = acc.Tensors("samples/text_summary")[-1].tensor_proto.string_val[0].decode()
    rows = table.splitlines()[2:]
    assert len(rows) == 8 and all("compression.jpeg_kb=" in row for row in rows)  # every sample, not one batch
    assert "reward_mean" in acc.Tags()["scalars"]


def test_before_after_grid(tmp_path, tiny_cache):
    from PIL import Image

    cfg = small_config(tmp_path, tiny_cache)
    cfg.run.num_epochs = 1
    train(cfg)
    out = cfg.run.output_dir / "before_after.png"  # the run folder by default, whatever the current folder
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.before_after",
            "--cache_dir",
            str(tiny_cache),
            "--lora",
            str(cfg.run.output_dir / "lora"),
            "--prompts",
            '["a cat", "an owl"]',
            "--per_prompt",
            "2",
            "--steps",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["reward"] == "compression" and summary["mean_before"] < 0 and summary["mean_after"] < 0
    assert summary["mean_before"] != summary["mean_after"]  # the LoRA changed the images
    width, height = Image.open(out).size  # 2 prompts x (2 before + 2 after), 64 px enlarged 3x to 192
    assert width == 4 * 192 and height > 2 * 192


def test_reward_overlap_modes(tmp_path, tiny_cache, compression_server):
    runs = {}
    for mode in ("none", "epoch", "next_epoch"):
        cfg = small_config(tmp_path / mode, tiny_cache, url=[compression_server.url], overlap=mode)
        cfg.run.num_epochs = 3
        runs[mode] = train(cfg)
        samples = (cfg.run.output_dir / "samples.jsonl").read_text().splitlines()
        assert len(samples) == 3 * 8 and [m["epoch"] for m in runs[mode]] == [0, 1, 2]
        assert runs[mode][-1]["global_step"] == 3 * 2
    # Same draws whatever the schedule: epoch 0 is sampled from the same weights and RNG in every mode,
    # and "none" differs from "epoch" only in when it submits.
    assert runs["none"][0]["reward_mean"] == runs["epoch"][0]["reward_mean"] == runs["next_epoch"][0]["reward_mean"]
    assert [m["reward_mean"] for m in runs["none"]] == [m["reward_mean"] for m in runs["epoch"]]


def test_groups_can_share_their_initial_noise(tmp_path, tiny_cache, monkeypatch):
    import trainer.epoch as epoch_phases

    cfg = small_config(tmp_path, tiny_cache)
    cfg = Config.model_validate(
        {
            **cfg.model_dump(),
            "sample": {**cfg.sample.model_dump(), "images_per_prompt": 2, "same_noise_per_group": True},
        }
    )
    cfg.run.num_epochs = 1
    starts, real = [], epoch_phases.sample

    def spy(*args, **kwargs):  # the real sampler; records where each trajectory began
        batch, final = real(*args, **kwargs)
        starts.append(batch.latents[:, 0])
        return batch, final

    monkeypatch.setattr(epoch_phases, "sample", spy)
    train(cfg)
    starts = torch.cat(starts)
    assert starts.shape[0] == 8
    for g in range(4):  # pairs in a row share their start; different groups do not
        assert torch.equal(starts[2 * g], starts[2 * g + 1])
    assert not torch.equal(starts[0], starts[2])


@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_batched_timesteps_give_the_same_gradient(tmp_path, tiny_cache, kl_coef):
    """One optimizer step over 4 samples x 5 timesteps: the gradient is the same whether the timesteps go through
    the UNet one at a time (as ddpo-pytorch), two at a time (groups of 2, 2, 1) or all together."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    grads = {}

    def run(k: int) -> dict[str, torch.Tensor]:
        cfg = Config(
            run={
                "output_dir": tmp_path / f"k{k}-{kl_coef}",
                "num_epochs": 1,
                "log_with": "none",
                "log_images_every": 0,
            },
            pretrained={"cache_dir": tiny_cache},
            sample={"num_steps": 10, "batch_size": 4, "num_batches_per_epoch": 1},
            train={
                "batch_size": 2,
                "gradient_accumulation_steps": 2,
                "timesteps_per_forward": k,
                "max_grad_norm": 1e9,
                "kl_coef": kl_coef,
            },
        )  # no clipping: the raw gradient is compared
        seen = []
        handle = register_optimizer_step_pre_hook(
            lambda opt, args, kwargs: seen.append(
                [p.grad.detach().clone() for g in opt.param_groups for p in g["params"]]
            )
        )
        try:
            train(cfg)
        finally:
            handle.remove()
        assert len(seen) == 1  # one optimizer step per epoch
        return seen[0]

    for k in (1, 2, 0):
        grads[k] = run(k)
    flat = {k: torch.cat([g.flatten() for g in v]) for k, v in grads.items()}
    assert float(flat[1].norm()) > 0
    for k in (2, 0):
        rel = float((flat[k] - flat[1]).norm() / flat[1].norm())
        # float32 sums of the same terms in other groupings: 1e-6 to 2e-5 apart depending on the CPU's
        # kernels (1.2e-5 on this session's machine); a wrong grouping or weighting is off by far more
        assert rel < 5e-5, (k, rel)


def test_compiled_channels_last_denoiser_trains_with_kl_and_stale_samples(tmp_path, tiny_cache):
    """run.compile goes through torch.compile on every path (sampling, training, the adapter-disabled KL
    reference, decoupled PPO's proximal pass); the eager backend keeps this quick on CPU, inductor is the
    same tracing with code generation after it. The weights are channels-last too (run.channels_last)."""
    from torch._dynamo import register_backend

    # A backend that runs what dynamo traced as is (the eager backend) and keeps what it was given: the graphs
    # prove the compile call happened, their weight inputs that they are channels-last
    graphs = []

    def recorded(graph, inputs):
        graphs.append(inputs)
        return graph.forward

    if "recorded_eager" not in torch._dynamo.list_backends(exclude_tags=()):
        register_backend(recorded, name="recorded_eager")
    cfg = small_config(tmp_path, tiny_cache)
    cfg.run.compile, cfg.run.log_with, cfg.train.kl_coef, cfg.reward.overlap = (
        "recorded_eager",
        "none",
        0.1,
        "next_epoch",
    )
    cfg.run.channels_last, cfg.train.ema_decay = True, 0.9  # and its (strided) weights are saved, EMA too
    history = train(cfg)
    assert graphs, "the denoiser never ran compiled"
    weights = [t for inputs in graphs for t in inputs if isinstance(t, torch.nn.Parameter) and t.dim() == 4]
    assert weights and all(t.is_contiguous(memory_format=torch.channels_last) for t in weights), (
        "the compiled denoiser's convolution weights are not channels-last"
    )
    assert any(not t.is_contiguous() for t in weights)  # a 1x1 kernel's weight is both; a 3x3 one is not
    assert [m["epoch"] for m in history] == [0, 1] and all(np.isfinite(m["loss"]) for m in history)
    assert history[0]["clipfrac_first_step"] == 0 and history[1]["kl_to_reference"] > 0


def test_a_redirected_stdout_gets_each_line_as_it_is_printed(tmp_path):
    """`python -m trainer > run.log`: stdout to a file is block-buffered, so a line would wait for the next
    progress bar to flush it (tqdm flushes stdout as each bar starts), or for the end of the run where no bar
    follows (the last epoch, the evaluations, the saved weights); the command line makes it line-buffered."""
    script = (
        "import sys; from trainer.cli import main; main(['--print-config']); "
        "print(sys.stdout.line_buffering, file=sys.stderr)"
    )
    with (tmp_path / "out").open("w") as out:
        result = subprocess.run(
            [sys.executable, "-c", script],
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},  # as a user's shell has it
            timeout=120,
        )
    assert result.returncode == 0 and result.stderr.strip().endswith("True")
    assert json.loads((tmp_path / "out").read_text())["algorithm"] == "nft"
