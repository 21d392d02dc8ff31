"""Presets, config files and the command line, layered; every preset's batch plan holds."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError
from pydantic_settings import CliApp

from trainer.config import Config
from trainer.plan import BatchPlan
from trainer.config.presets import PRESETS

PROCESSES = {"sd15-compressibility": 8, "sd15-incompressibility": 8, "sd15-aesthetic": 8, "sd15-alignment": 6}


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_published_presets_and_their_one_gpu_variants(name):
    full, single = Config(preset=name), Config(preset=f"{name}-1gpu")
    many, one = BatchPlan.of(full, PROCESSES[name]), BatchPlan.of(single, 1)
    assert many.samples_per_epoch == one.samples_per_epoch == (288 if "alignment" in name else 256)
    assert many.effective_train_batch == one.effective_train_batch
    assert single.train.batch_size == 1
    assert full.pretrained.model == "runwayml/stable-diffusion-v1-5" and full.run.mixed_precision == "fp16"
    assert (full.train.learning_rate, full.ddpo.clip_range, full.sample.num_steps) == (3e-4, 1e-4, 50)
    assert full.train.lora_targets == ["to_q", "to_k", "to_v", "to_out.0"] and full.train.per_prompt_stat_tracking


@pytest.mark.parametrize(
    "name",
    ["flux2-klein-pickscore-grpo", "flux2-klein-pickscore-nft", "wan21-t2v-pickscore-nft", "zimage-pickscore-grpo"],
)
def test_the_new_families_one_gpu_variants_keep_the_epoch_and_the_effective_batch(name):
    """bench.gpu_families sized these for one 80 GB GPU: the same samples an epoch and effective train batch as
    the 8-GPU recipe, one sample a training forward, the rest of the recipe unchanged."""
    full, single = Config(preset=name), Config(preset=f"{name}-1gpu")
    many, one = BatchPlan.of(full, 8), BatchPlan.of(single, 1)
    assert many.samples_per_epoch == one.samples_per_epoch and many.effective_train_batch == one.effective_train_batch
    assert single.train.batch_size == 1 and single.train.learning_rate == full.train.learning_rate
    assert single.pretrained.model == full.pretrained.model and single.algorithm == full.algorithm


def test_preset_specifics():
    assert Config(preset="sd15-incompressibility").reward.scorer == "incompressibility"
    aesthetic = Config(preset="sd15-aesthetic")
    assert (aesthetic.run.num_epochs, aesthetic.prompt.fn, aesthetic.train.stat_buffer_size) == (
        200,
        "simple_animals",
        32,
    )
    assert Config(preset="sd15-alignment").prompt.fn == "nouns_activities"
    assert Config().model_dump() == Config(preset="tiny").model_dump()


def test_layers_preset_then_file_then_command_line(tmp_path):
    (tmp_path / "run.json").write_text(
        json.dumps({"train": {"learning_rate": 1e-5}, "ddpo": {"clip_range": 2e-4}, "run": {"num_epochs": 3}})
    )
    (tmp_path / "run.toml").write_text("[train]\nlearning_rate = 2e-5\n[sample]\nnum_steps = 30\n")
    cfg = CliApp.run(
        Config,
        cli_args=[
            "--preset",
            "sd15-aesthetic",
            "--config",
            str(tmp_path / "run.json"),
            "--train.learning_rate",
            "7e-5",
        ],
    )
    assert cfg.train.learning_rate == 7e-5  # command line over file
    assert cfg.ddpo.clip_range == 2e-4 and cfg.run.num_epochs == 3  # file over preset
    assert cfg.prompt.fn == "simple_animals" and cfg.sample.num_steps == 50  # preset under both
    toml = CliApp.run(Config, cli_args=["--config", str(tmp_path / "run.toml")])
    assert (toml.train.learning_rate, toml.sample.num_steps, toml.ddpo.clip_range) == (2e-5, 30, 1e-2)
    # the saved config reproduces itself
    assert Config.model_validate_json(cfg.model_dump_json()) == cfg


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"preset": "sd99"}, "unknown preset 'sd99'"),
        ({"config": "missing.json"}, "no such file"),
        ({"reward": {"options": {"weights": "x"}}}, "scorer 'compression' takes no option weights"),
        ({"prompt": {"fn": "from_file"}}, "from_file needs an existing file"),
        ({"train": {"lr_scheduler": "exponential"}}, "lr_scheduler"),
    ],
)
def test_bad_settings_name_the_field(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        Config(**kwargs)


def test_every_preset_validates():
    for name in PRESETS:
        Config(preset=name)


def test_timesteps_per_forward_fits_the_memory_budget():
    """``fits`` from peaks at 1 and 2 timesteps: a linear model of memory (5 GiB fixed, 3 GiB per timestep)."""
    from trainer.plan import fits

    gib = 2**30
    calls = []

    def peak(k):
        calls.append(k)
        return 5 * gib + 3 * k * gib

    assert fits(peak, 25, 40 * gib) == 11 and calls == [1, 2]  # 5 + 3 x 11 = 38 <= 40 < 41
    assert fits(peak, 25, 38 * gib) == 11 and fits(peak, 25, 37 * gib) == 10
    assert fits(peak, 10, 1000 * gib) == 10  # never more than the trained timesteps
    assert fits(peak, 25, 7 * gib) == 1  # not even one fits: one at a time, and the run finds out
    calls.clear()
    assert fits(peak, 1, 40 * gib) == 1 and calls == [1]
    cfg = Config(train={"timesteps_per_forward": 0}, sample={"num_steps": 20})
    plan = BatchPlan.of(cfg, 1).with_timesteps_per_forward(cfg, 4)
    assert [(s.start, s.stop) for s in plan.step_groups] == [(0, 4), (4, 8), (8, 10)]
    assert len(BatchPlan.of(cfg, 1).step_groups) == 1  # 0: all ten in one forward until a GPU measures
