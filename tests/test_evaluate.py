"""Evaluation: deterministic, independent of the batch size, the same numbers in the trainer and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from scorers.scorer import create_scorer
from trainer.config import Config
from trainer.algorithms.ddpo.loop import train
from trainer.evaluate import evaluate
from trainer.tools.evaluate import EvalSettings, run_evaluation
from trainer.families.models import load_family
from trainer.rewards import Rewards

pytestmark = pytest.mark.slow

PROMPTS = ["a cat", "a red fox", "an owl"]


@pytest.mark.parametrize("preset", ["tiny", "tiny-sd3"])
def test_images_and_scores_do_not_depend_on_the_batch_size(tiny_cache, preset):
    cfg = Config(preset=preset, pretrained={"cache_dir": tiny_cache})
    family = load_family(cfg, torch.device("cpu"))
    rewards = Rewards(cfg.reward)
    before = getattr(family.pipe.scheduler, "num_inference_steps", None)
    try:
        runs = [
            evaluate(
                family,
                family.denoiser,
                PROMPTS,
                [{}] * 3,
                rewards,
                num_steps=5,
                guidance_scale=4.0,
                resolution=64,
                seeds=[7, 8, 9],
                batch_size=b,
            )
            for b in (1, 2, 3)
        ]
    finally:
        rewards.close()
    for images, scored in runs[1:]:  # the same up to float rounding (batched kernels sum in another order)
        diff = np.abs(images.astype(int) - runs[0][0])
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
        np.testing.assert_allclose(scored["compression"].scores, runs[0][1]["compression"].scores, rtol=0.02)
    assert len({im.tobytes() for im in runs[0][0]}) == 3  # three seeds, three images
    # the scores are the scorer's own on those images
    scorer = create_scorer("compression")
    scorer.load("cpu")
    np.testing.assert_allclose(runs[0][1]["compression"].scores, scorer.score(runs[0][0], PROMPTS, [{}] * 3).scores)
    assert family.pipe.scheduler.num_inference_steps == (before or 5)  # the schedule it found is restored


def test_the_trainers_evaluation_is_the_clis_on_the_same_weights(tmp_path, tiny_cache):
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "run"
    cfg = Config(
        run={
            "output_dir": out,
            "num_epochs": 2,
            "eval_every": 1,
            "log_with": "none",
            "log_images_every": 0,
            "save_freq": 1,
        },
        pretrained={"cache_dir": tiny_cache},
        prompt={"eval_path": held_out},
        sample={"num_steps": 4, "eval_num_steps": 6, "batch_size": 4, "num_batches_per_epoch": 1},
        train={"batch_size": 2},
    )
    train(cfg)
    records = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2]  # before training, after each epoch
    assert (out / "eval" / "after-0002.png").is_file()
    assert records[0]["reward_mean"] != records[2]["reward_mean"]

    # The trainer's batches (sample.batch_size 4): another batch size changes the images' last bits (the CPU
    # kernels block by batch), and a JPEG's size by a byte on some machines
    common = dict(
        cache_dir=tiny_cache, prompts=held_out, steps=6, guidance_scale=5.0, seed=cfg.run.eval_seed, batch_size=4
    )
    base = run_evaluation(EvalSettings(out=tmp_path / "base", **common))
    tuned = run_evaluation(EvalSettings(out=tmp_path / "tuned", lora=out / "lora", **common))
    for cli, trainer in ((base, records[0]), (tuned, records[2])):
        assert [p["prompt"] for p in cli["per_prompt"]] == PROMPTS
        assert cli["reward_mean"] == pytest.approx(trainer["reward_mean"], abs=1e-9)
        assert [p["reward"] for p in cli["per_prompt"]] == pytest.approx([p["reward"] for p in trainer["per_prompt"]])

    # A resumed run evaluates from its checkpoint on, and eval.jsonl keeps one record per epoch.
    again = cfg.model_copy(update={"run": cfg.run.model_copy(update={"num_epochs": 3, "resume_from": out})})
    train(again)
    assert [json.loads(line)["epoch"] for line in (out / "eval.jsonl").read_text().splitlines()] == [0, 1, 2, 3]


def test_the_evaluation_images_do_not_depend_on_the_training_seed(tmp_path, tiny_cache):
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("\n".join(PROMPTS) + "\n")

    def first_evaluation(**run) -> list[float]:
        cfg = Config(
            run={
                "output_dir": tmp_path / str(run),
                "num_epochs": 1,
                "eval_every": 1,
                "log_with": "none",
                "log_images_every": 0,
                **run,
            },
            pretrained={"cache_dir": tiny_cache},
            prompt={"eval_path": held_out},
            sample={"num_steps": 3, "batch_size": 3, "num_batches_per_epoch": 1},
            train={"batch_size": 3},
        )
        train(cfg)
        record = json.loads((cfg.run.output_dir / "eval.jsonl").read_text().splitlines()[0])
        return [p["reward"] for p in record["per_prompt"]]

    base = first_evaluation(seed=1)
    assert first_evaluation(seed=2) == base  # another training seed, the same evaluation images
    assert first_evaluation(seed=1, eval_seed=7) != base


def test_cli_writes_json_and_a_grid(tmp_path, tiny_cache):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.evaluate",
            "--cache_dir",
            str(tiny_cache),
            "--count",
            "2",
            "--per_prompt",
            "2",
            "--steps",
            "3",
            "--out",
            str(tmp_path / "ev"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary == json.loads((tmp_path / "ev" / "eval.json").read_text())
    rewards = [r for p in summary["per_prompt"] for r in p["rewards"]]
    assert len(summary["per_prompt"]) == 2 and len(rewards) == 4
    assert summary["reward_mean"] == pytest.approx(np.mean(rewards)) and summary["reward_compression_mean"] < 0
    assert (tmp_path / "ev" / "eval.png").stat().st_size > 0

    bad = subprocess.run(
        [sys.executable, "-m", "trainer.evaluate", "--reward", "nonesuch"], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode != 0 and "nonesuch" in bad.stderr and "Traceback" not in bad.stderr
