"""On real tiny runs: resume trims the logs, damaged checkpoints are skipped loudly,
Ctrl-C closes the reward clients, the token survives config.json, grids and schedulers that used to break."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time

import numpy as np
import pytest
from pydantic_settings import CliApp

from tests.conftest import no_model_loads
from trainer.config import Config
from trainer.algorithms.ddpo.loop import train

pytestmark = pytest.mark.timeout(300)


def tiny_run(tmp_path, tiny_cache, epochs: int, **reward) -> Config:
    """One sampling batch of 4 per epoch, two optimizer steps, a checkpoint every epoch."""
    return Config(
        run={
            "output_dir": tmp_path / "run",
            "num_epochs": epochs,
            "save_freq": 1,
            "log_with": "tensorboard",
            "log_images_every": 0,
        },
        pretrained={"cache_dir": tiny_cache},
        sample={"num_steps": 4, "batch_size": 4, "num_batches_per_epoch": 1},
        train={"batch_size": 2},
        reward=reward,
    )


def epochs_of(path) -> list[int]:
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines()]


def scalar_steps(out, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out), size_guidance={"scalars": 0}).Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


# -- a resumed run's logs --------------------------------------------------------------------------------------
def test_a_resumed_run_logs_each_epoch_once(tmp_path, tiny_cache):
    cfg = tiny_run(tmp_path, tiny_cache, 2)
    out = cfg.run.output_dir
    first = train(cfg)
    # As a run killed after epoch 1's logs but before its checkpoint leaves it:
    shutil.rmtree(out / "checkpoints" / "checkpoint-2")
    with open(out / "samples.jsonl", "a") as f:
        f.write('{"epoch": 1, "process": 0, "prom')  # and a line torn mid-write
    cfg.run.resume_from = out
    again = train(cfg)
    assert [m["epoch"] for m in again] == [1]
    assert epochs_of(out / "metrics.jsonl") == [0, 1]
    assert epochs_of(out / "samples.jsonl") == [0] * 4 + [1] * 4
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[1]) == again[0]
    steps = scalar_steps(out, "reward_mean")  # tensorboard's view: epoch 1 once, the redone one
    assert [s for s, _ in steps] == [0, 1]
    assert steps[1][1] == pytest.approx(again[0]["reward_mean"])
    assert again[0]["reward_mean"] == first[1]["reward_mean"] and again[0]["loss"] == first[1]["loss"]  # exact


def test_resume_from_auto_starts_fresh_then_continues(tmp_path, tiny_cache):
    """run.resume_from auto, what a restarted job is given: the first start finds no checkpoint (and drops the
    logs of a try that died before its first one), the second continues the first."""
    cfg = tiny_run(tmp_path, tiny_cache, 1)
    out, cfg.run.resume_from = cfg.run.output_dir, "auto"
    out.mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"epoch": 0, "reward_mean": 99}\n')  # an earlier try, no checkpoint
    first = train(cfg)
    assert epochs_of(out / "metrics.jsonl") == [0] and json.loads((out / "metrics.jsonl").read_text()) == first[0]
    cfg.run.num_epochs = 2
    again = train(cfg)
    assert [m["epoch"] for m in again] == [1] and epochs_of(out / "metrics.jsonl") == [0, 1]


# -- damaged checkpoints ---------------------------------------------------------------------------------------
def test_a_truncated_newest_checkpoint_falls_back_to_the_older_one(tmp_path, tiny_cache, capsys):
    cfg = tiny_run(tmp_path, tiny_cache, 2)
    out = cfg.run.output_dir
    train(cfg)
    newest = out / "checkpoints" / "checkpoint-2"
    bad = newest / "trainable.safetensors"
    bad.write_bytes(bad.read_bytes()[:1000])
    capsys.readouterr()

    # Named explicitly, it fails naming the file, before any model loads.
    cfg.run.resume_from = newest
    with no_model_loads(), pytest.raises(ValueError, match=re.escape(str(bad))):  # a checkpoint.CheckpointError
        train(cfg)

    # The run folder: the newest good checkpoint, said loudly.
    cfg.run.resume_from = out
    history = train(cfg)
    captured = capsys.readouterr()
    assert f"checkpoint {newest} is damaged" in captured.err and str(bad) in captured.err
    assert "resuming from the older checkpoint" in captured.err and "checkpoint-1" in captured.err
    assert f"resumed from {out / 'checkpoints' / 'checkpoint-1'}" in captured.out
    assert [m["epoch"] for m in history] == [1]
    assert (newest / "manifest.json").exists()  # written again, whole


def test_checkpoint_verification(tmp_path, tiny_cache):
    from trainer import checkpoint

    cfg = tiny_run(tmp_path, tiny_cache, 1)
    cfg.train.ema_decay = 0.9
    train(cfg)
    good = cfg.run.output_dir / "checkpoints" / "checkpoint-1"
    manifest = json.loads((good / "manifest.json").read_text())["files"]
    assert {
        "trainable.safetensors",
        "optimizer.pt",
        "ema.safetensors",
        "rng-0.safetensors",
        "rng-0.json",
        "state.json",
    } <= set(manifest)
    assert checkpoint.verify(good) is None and checkpoint.resolve(good) == good

    def damaged(name: str, change) -> str:
        copy = tmp_path / f"copy-{len(list(tmp_path.glob('copy-*')))}" / "checkpoint-1"
        shutil.copytree(good, copy)
        change(copy)
        return checkpoint.verify(copy), copy

    def flip(copy):  # same size, one byte different
        data = bytearray((copy / "optimizer.pt").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (copy / "optimizer.pt").write_bytes(bytes(data))

    problem, copy = damaged("flipped", flip)
    assert problem == f"{copy / 'optimizer.pt'} does not match its sha256 in the manifest"
    problem, copy = damaged("missing", lambda c: (c / "ema.safetensors").unlink())
    assert problem == f"{copy / 'ema.safetensors'} is missing"
    # Written before manifests: accepted when every file parses, else the file is named.
    problem, _ = damaged("legacy", lambda c: (c / "manifest.json").unlink())
    assert problem is None

    def legacy_truncated(copy):
        (copy / "manifest.json").unlink()
        (copy / "optimizer.pt").write_bytes((copy / "optimizer.pt").read_bytes()[:-100])

    problem, copy = damaged("legacy-truncated", legacy_truncated)
    assert problem.startswith(f"{copy / 'optimizer.pt'} is damaged")
    with pytest.raises(checkpoint.CheckpointError, match="no usable checkpoint under"):
        checkpoint.resolve(tmp_path / "nowhere")


# -- Ctrl-C ----------------------------------------------------------------------------------------------------
def test_ctrl_c_mid_run_closes_the_reward_clients_and_keeps_the_checkpoint(tmp_path, tiny_cache, start_server):
    server = start_server("--model", "synthetic")
    cfg = tiny_run(
        tmp_path,
        tiny_cache,
        3,
        components=[
            {"scorer": "compression"},
            {"scorer": "synthetic", "name": "brightness", "url": [server.url]},
        ],
    )
    before = set(threading.enumerate())
    seen = []

    def ctrl_c(epoch, batches):  # after epoch 1's rewards, before its training
        seen.append(epoch)
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, image_samples_hook=ctrl_c)
    assert seen == [0, 1]
    deadline = time.monotonic() + 5
    while (
        left := [t.name for t in threading.enumerate() if t not in before and t.is_alive()]
    ) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"threads left running after Ctrl-C: {left}"
    checkpoints = cfg.run.output_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-1"]
    cfg.run.resume_from, cfg.run.num_epochs = cfg.run.output_dir, 2
    assert [m["epoch"] for m in train(cfg)] == [1]


# -- the token and config.json ---------------------------------------------------------------------------------
def test_config_json_given_back_takes_the_token_from_the_environment(tmp_path, tiny_cache, monkeypatch):
    monkeypatch.setenv("DIFFUSION_RL_REWARD__TOKEN", "env-token-0123")
    cfg = tiny_run(tmp_path, tiny_cache, 1)
    cfg.run.log_with = "none"
    train(cfg)
    written = (cfg.run.output_dir / "config.json").read_text()
    assert "env-token-0123" not in written and "**********" not in written
    assert "token" not in json.loads(written)["reward"]
    again = CliApp.run(Config, cli_args=["--config", str(cfg.run.output_dir / "config.json")])
    assert again.reward.token.get_secret_value() == "env-token-0123"
    assert again.model_dump(exclude={"config"}) == cfg.model_dump(exclude={"config"})


# -- a password in a reward URL --------------------------------------------------------------------------------
def test_a_password_in_the_reward_url_reaches_the_server_and_no_file_of_the_run(tmp_path, tiny_cache, start_server):
    server = start_server("--model", "compression")
    url = server.url.replace("http://", "http://user:s3cretPW@")
    cfg = tiny_run(tmp_path, tiny_cache, 1, url=[url], scorer="compression")
    history = train(cfg)
    assert history[0]["reward_mean"] < 0 and server.metric("reward_requests_total", status="200") > 0  # it was used
    written = {p: p.read_bytes() for p in cfg.run.output_dir.rglob("*") if p.is_file()}
    assert any(p.name.startswith("events.out.tfevents") for p in written)  # the tensorboard hparams are among them
    assert [str(p) for p, data in written.items() if b"s3cretPW" in data] == []
    assert b"user:**********@127.0.0.1" in (cfg.run.output_dir / "config.json").read_bytes()


# -- grids and schedulers that used to break -------------------------------------------------------------------
@pytest.mark.timeout(20)
def test_captions_fit_images_of_any_width():
    from PIL import Image, ImageDraw, ImageFont

    from trainer.grid import MIN_CELL_PX, grid, wrap

    draw, font = ImageDraw.Draw(Image.new("RGB", (1, 1))), ImageFont.load_default()
    caption = "+1.234 a tiny turkey riding a bicycle through a field of extraordinarily-long-hyphenated-words"
    for width in (1, 2, 5, 8, 11, 12, 13, 30, 64, 300):
        sheet = grid([np.zeros((8, width, 3), np.uint8)] * 3, [caption, "…", ""], columns=2)
        cell = width * max(1, -(-MIN_CELL_PX // width))
        assert sheet.size[0] == 2 * cell and cell >= min(width, MIN_CELL_PX)
        for text in (caption, "…", "ab", ""):
            for pixels in (0, 1, width, cell):
                lines = wrap(draw, text, font, pixels)
                assert "".join(lines).replace(" ", "") == text.replace(" ", "")  # nothing cut
                assert all(draw.textlength(line, font=font) <= pixels or len(line) == 1 for line in lines)
    assert wrap(draw, "a cat", font, 100) == ["a cat"]
    assert len(wrap(draw, caption, font, 180)) > 1


def _tiny_copy(tmp_path, tiny_cache, **scheduler) -> str:
    from trainer.families.tiny_pipeline import tiny_pipeline_path

    copy = tmp_path / "pipeline"
    shutil.copytree(tiny_pipeline_path(tiny_cache), copy)
    config = copy / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **scheduler}))
    return str(copy)


@pytest.mark.parametrize(
    "scheduler, steps, message",
    [
        ({"thresholding": True}, 20, "thresholding"),
        ({"timestep_spacing": "linspace"}, 20, "timestep_spacing 'linspace'"),
        ({"timestep_spacing": "trailing"}, 30, "timestep_spacing 'trailing'"),
    ],
)
def test_a_scheduler_the_log_prob_step_does_not_model_fails_at_load(tmp_path, tiny_cache, scheduler, steps, message):
    import torch

    from trainer.families.models import load_pipeline

    cfg = Config(pretrained={"model": _tiny_copy(tmp_path, tiny_cache, **scheduler)}, sample={"num_steps": steps})
    with pytest.raises(ValueError, match=rf"pretrained.model: .*{re.escape(message)}"):
        load_pipeline(cfg, torch.device("cpu"))


def test_a_clipping_scheduler_is_refused():
    # StableDiffusionPipeline resets clip_sample to false itself; a scheduler built another way is checked too.
    from diffusers import DDIMScheduler

    from trainer.families.ddim import check_scheduler

    with pytest.raises(ValueError, match="sets clip_sample true"):
        check_scheduler(DDIMScheduler(clip_sample=True), 20)
    check_scheduler(DDIMScheduler(clip_sample=False), 20)


def test_evenly_spaced_schedules_load(tmp_path, tiny_cache):
    import torch

    from trainer.families.models import load_pipeline

    for spacing, steps in (("leading", 30), ("trailing", 20)):
        cfg = Config(
            pretrained={"model": _tiny_copy(tmp_path / spacing, tiny_cache, timestep_spacing=spacing)},
            sample={"num_steps": steps},
        )
        load_pipeline(cfg, torch.device("cpu"))


# -- unguided training of unguided samples stays allowed -------------------------------------------------------
def test_unguided_training_of_scale_1_samples_starts_at_ratio_1(tiny_cache):
    import torch

    from trainer.families.models import load_pipeline
    from trainer.families.models import family_of
    from trainer.sampling import rescore, sample

    cfg = Config(
        pretrained={"cache_dir": tiny_cache}, ddpo={"cfg": False}, sample={"guidance_scale": 1.0, "num_steps": 4}
    )
    pipe = load_pipeline(cfg, torch.device("cpu"))
    negative = family_of(pipe).encode_prompts([""])
    torch.manual_seed(0)
    batch, _ = sample(family_of(pipe), pipe.unet, ["a cat", "an owl"], [{}, {}], negative, 4, 1.0, 1.0, 64)
    for j in range(4):  # training (ddpo.cfg false: no negative prompt) re-scores exactly what was sampled
        log_prob, _, _ = rescore(family_of(pipe), pipe.unet, batch, j, None, 1.0, 1.0)
        assert torch.equal(log_prob, batch.log_probs[:, j])


# -- next-epoch sampling ---------------------------------------------------------------------------------------
def test_next_epoch_samples_are_clipped_around_the_current_weights(tmp_path, tiny_cache):
    def run(name, overlap, decoupled="auto"):
        cfg = tiny_run(tmp_path / name, tiny_cache, 2)
        cfg.run.log_with, cfg.reward.overlap, cfg.ddpo.decoupled_ppo = "none", overlap, decoupled
        return train(cfg)

    plain, fresh = run("plain", "epoch"), run("fresh", "epoch", "on")
    # Samples from the current weights: the proximal policy is the sampling one, decoupled PPO is plain PPO.
    assert [m["loss"] for m in fresh] == pytest.approx([m["loss"] for m in plain], rel=1e-4, abs=1e-9)
    assert all(m["clipfrac_first_step"] == 0 and m["stale_clipfrac"] == 0 for m in fresh)
    stale, ahead = run("stale", "next_epoch", "off"), run("ahead", "next_epoch")  # auto: decoupled
    assert stale[1]["clipfrac_first_step"] > 0.1  # epoch 1 was sampled before epoch 0's updates
    assert ahead[1]["clipfrac_first_step"] == 0 and ahead[1]["stale_clipfrac"] > 0.1
    assert ahead[0]["reward_mean"] == stale[0]["reward_mean"] and ahead[1]["reward_mean"] == stale[1]["reward_mean"]
