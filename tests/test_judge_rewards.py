"""Judge rewards in the trainer: GDPO's per-component normalisation within the group, checked against the
formula written out again; a dropped sample's zero advantage; the judge counts in the metrics; the judge's
model list checked in preflight."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from pydantic import ValidationError

from tests.test_vlm import MODEL, faults, judge  # noqa: F401 - the stand-in judge fixture
from trainer.advantages import compute_advantages
from trainer.config import Config, RewardConfig
from trainer.preflight import PreflightError, check
from trainer.advantages import kept_advantages
from trainer.rewards import Rewards, counts, dropped


def gdpo_by_hand(scores: dict[str, list[float]], weights: dict[str, float], groups: list[int]) -> list[float]:
    """Pref-GRPO's per-reward group z-score (r - mean_g) / (std_g + 1e-8), summed with the weights; loops only."""
    total = [0.0] * len(groups)
    for name, values in scores.items():
        for g in set(groups):
            members = [i for i, h in enumerate(groups) if h == g]
            mean = sum(values[i] for i in members) / len(members)
            std = math.sqrt(sum((values[i] - mean) ** 2 for i in members) / len(members))
            for i in members:
                total[i] += weights[name] * (values[i] - mean) / (std + 1e-8)
    return total


@pytest.fixture
def two_rewards():
    def make(aggregation: str) -> Rewards:
        cfg = RewardConfig(
            components=[{"scorer": "compression", "weight": 2.0}, {"scorer": "synthetic", "weight": 0.5}],
            aggregation=aggregation,
        )
        return Rewards(cfg)

    return make


def test_gdpo_normalises_each_component_within_its_group_before_the_weighted_sum(two_rewards):
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(4), 4)
    scores = {"compression": rng.normal(0, 100, 16), "synthetic": rng.normal(0, 0.01, 16)}
    scores["synthetic"][8:12] = 0.3  # a group whose scores are all equal: zeros, not a division by 0
    gdpo = two_rewards("gdpo")
    expected = gdpo_by_hand({k: v.tolist() for k, v in scores.items()}, {"compression": 2.0, "synthetic": 0.5}, groups)
    np.testing.assert_allclose(gdpo.combine(scores, groups), expected, rtol=1e-9, atol=1e-9)
    # a plain sum is the compression reward's alone to the eye; GDPO weighs the small one as its weight says
    plain = two_rewards("sum").combine(scores, groups)
    np.testing.assert_allclose(plain, 2.0 * scores["compression"] + 0.5 * scores["synthetic"])
    stats = gdpo.stats(scores, groups, [{}] * 16)
    assert stats["reward_synthetic_normalized_mean"] == pytest.approx(0.0, abs=1e-9)
    assert stats["reward_compression_normalized_std"] == pytest.approx(1.0)
    assert stats["reward_synthetic_normalized_std"] == pytest.approx(math.sqrt(3 / 4), rel=1e-5)  # a group of 4 is 0
    assert "reward_compression_normalized_mean" not in two_rewards("sum").stats(scores, groups, [{}] * 16)


def test_gdpo_and_normalize_together_are_refused_naming_the_component():
    with pytest.raises(ValidationError, match=r"drop normalize from reward.components\[1\] \(synthetic\)"):
        RewardConfig(
            components=[{"scorer": "compression"}, {"scorer": "synthetic", "normalize": True}], aggregation="gdpo"
        )


def test_a_dropped_sample_gets_no_advantage_and_moves_no_group_statistic():
    rewards = np.array([1.0, 0.0, 0.5, 0.7, 0.2, 0.9])
    groups = np.array([0, 0, 0, 1, 1, 1])
    prompts = ["a"] * 3 + ["b"] * 3
    drop = np.array([False, False, True, False, False, False])
    got = kept_advantages(rewards, prompts, None, groups, False, drop)
    assert got[2] == 0.0
    np.testing.assert_allclose(got[:2], [0.5 / (0.5 + 1e-6), -0.5 / (0.5 + 1e-6)])  # as if the group were {1, 0}
    np.testing.assert_allclose(got[3:], compute_advantages(rewards[3:], prompts[3:], None, groups[3:] - 1))
    assert not kept_advantages(rewards, prompts, None, groups, False, np.ones(6, bool)).any()


def test_the_judge_counts_are_summed_per_component():
    one = [{"reasked": 2, "failed_calls": 1, "dropped": 1}, {"reasked": 0, "failed_calls": 0, "dropped": 0}]
    assert counts(one, ["vlm"]) == {
        "reward_vlm_reasked": 2.0,
        "reward_vlm_failed_calls": 1.0,
        "reward_vlm_dropped": 1.0,
    }
    several = [{"vlm/dropped": 0, "clip": 0.3}, {"vlm/dropped": 1, "clip": 0.2}]
    assert counts(several, ["vlm", "clipscore"]) == {"reward_vlm_dropped": 1.0}
    assert dropped(several, ["vlm", "clipscore"]).tolist() == [False, True]
    # another scorer's info of the same name is not a count (the shapes verifier's failed claims, say)
    shapes = [{"failed": ["a red circle"], "dropped": "no", "correct": False}, {"failed": [], "dropped": "no"}]
    assert counts(shapes, ["shapes"]) == {} and not dropped(shapes, ["shapes"]).any()


def test_preflight_names_the_setting_of_a_model_the_judge_server_does_not_serve(judge, tmp_path):  # noqa: F811
    faults(judge)

    def config(model: str) -> Config:
        return Config(
            run={"output_dir": tmp_path / "run", "log_with": "none"},
            pretrained={"cache_dir": tmp_path / "cache"},
            reward={"scorer": "vlm", "options": {"base_url": f"{judge}/v1", "model": model, "mode": "yesno"}},
        )

    with pytest.raises(PreflightError, match=rf"--reward.options model=\.\.\.: {judge}/v1 serves '{MODEL}', not 'Qwen"):
        check(config("Qwen3-VL"), 1, "cpu")
    check(config(MODEL), 1, "cpu")  # the right name passes


def shapes_run(tmp_path, *reward: str, env: dict[str, str] | None = None):
    """One epoch of shapes-sd3-nft (4 images, groups of 2) rewarded as ``reward`` says; its logs."""
    result = subprocess.run(
        [sys.executable, "-m", "trainer", "--preset", "shapes-sd3-nft", "--run.output_dir", str(tmp_path / "run"),
         "--run.num_epochs", "1", "--run.eval_every", "0", "--run.log_with", "none", "--sample.batch_size", "4",
         "--sample.num_batches_per_epoch", "1", "--sample.images_per_prompt", "2", "--train.batch_size", "2",
         "--sample.num_steps", "4", *reward],
        capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    return result, metrics, samples


def test_a_shapes_run_judged_by_the_vlm_counts_its_drops_and_writes_no_key(judge, tmp_path):  # noqa: F811
    secret = "sk-judge-secret-42"
    faults(judge, "garbage", "garbage", "garbage")  # the first image's every ask (concurrency 1: in order)
    options = [f"base_url={judge}/v1", f"model={MODEL}", "mode=yesno", "concurrency=1", "api_key_env=JUDGE_KEY"]
    reward = ["--reward.scorer", "vlm", *sum((["--reward.options", o] for o in options), [])]
    result, metrics, samples = shapes_run(tmp_path, *reward, env={"JUDGE_KEY": secret})
    counted = (metrics["reward_vlm_reasked"], metrics["reward_vlm_failed_calls"], metrics["reward_vlm_dropped"])
    assert counted == (2, 0, 1)
    assert [s["dropped"] for s in samples] == [1, 0, 0, 0] and "weather" in samples[0]["reply"]
    assert samples[0]["reward"] == samples[1]["reward"]  # the dropped one's stand-in: its group's other score
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["reward"]["options"]["api_key_env"] == "JUDGE_KEY"
    written = [p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert not any(secret.encode() in data for data in written) and secret not in result.stdout + result.stderr


def test_a_gdpo_run_sums_the_components_normalised_within_each_group(judge, tmp_path):  # noqa: F811
    faults(judge)
    components = [
        {"scorer": "vlm", "options": {"base_url": f"{judge}/v1", "model": MODEL, "mode": "pointwise"}},
        {"scorer": "compression", "weight": 0.5},
    ]
    reward = ["--reward.components", json.dumps(components), "--reward.aggregation", "gdpo"]
    _, metrics, samples = shapes_run(tmp_path, *reward)
    groups = [0, 0, 1, 1]
    expected = gdpo_by_hand(
        {n: [s[n] for s in samples] for n in ("vlm", "compression")}, {"vlm": 1.0, "compression": 0.5}, groups
    )
    np.testing.assert_allclose([s["reward"] for s in samples], expected, rtol=1e-6, atol=1e-6)
    assert metrics["reward_compression_normalized_std"] == pytest.approx(1.0, abs=1e-6)  # groups of 2 differ
    assert metrics["reward_vlm_dropped"] == 0 and [s["vlm/dropped"] for s in samples] == [0] * 4
