"""Steps whose std is 0 cannot be trained (a zero policy gradient, and log-ratios of millions for the least
change of the mean): a configuration that could train one is refused before any model loads, naming the
settings; windows and fractions that leave such steps out are accepted."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from pydantic import ValidationError

from trainer.config import Config
from trainer.algorithms.ddpo.trained_steps import draw_window, trainable_steps


def groups(train: dict) -> dict:
    """``train``'s settings, the window's in the ddpo group where they moved (issue 40)."""
    moved = {k: v for k, v in train.items() if k.startswith("timestep_window")}
    return {"train": {k: v for k, v in train.items() if k not in moved}, "ddpo": moved}


def cps(**train) -> dict:
    return {"preset": "tiny-sd3", "sample": {"sde_type": "cps", "eta": 0.8}, **groups(train)}


@pytest.mark.parametrize(
    "train, steps",
    [
        ({"timestep_fraction": 1.0, "timestep_selection": "random"}, range(10)),
        ({"timestep_fraction": 0.5, "timestep_selection": "random"}, range(10)),  # any 5 of the 10
        ({"timestep_fraction": 0.99, "timestep_selection": "first"}, range(9)),  # Flow-GRPO: steps 0-8
        ({"timestep_fraction": 0.5, "timestep_selection": "first"}, range(5)),
        ({"timestep_window": 3, "timestep_window_latest_start": 2, "timestep_fraction": 1.0}, range(5)),
        (  # Flow-Factory's sde_steps [1, 2, 3]
            {"timestep_window": 1, "timestep_window_earliest_start": 1, "timestep_window_latest_start": 3},
            range(1, 4),
        ),
        (
            {
                "timestep_window": 4,
                "timestep_window_latest_start": 6,
                "timestep_fraction": 0.5,
                "timestep_selection": "first",
            },
            range(8),
        ),  # windows 0-3 ... 6-9, the first 2 of each
    ],
)
def test_trainable_steps(train, steps):
    cfg = Config(preset="tiny-sd3", **groups(train))
    assert trainable_steps(cfg) == steps


def test_the_window_starts_between_its_earliest_and_latest_start():
    """Every start from earliest to latest is drawn, no other; from 0 the draws are those made before the earliest
    start existed (rng.integers(latest + 1)), so a checkpoint's rng resumes the same windows."""
    import numpy as np

    window = {"timestep_window": 2, "timestep_fraction": 1.0}
    ff = Config(
        preset="tiny-sd3", **groups({**window, "timestep_window_earliest_start": 1, "timestep_window_latest_start": 3})
    )
    rng = np.random.default_rng(0)
    windows = [draw_window(ff.ddpo, rng) for _ in range(200)]
    assert {w.start for w in windows} == {1, 2, 3} and {len(w) for w in windows} == {2}
    old = Config(preset="tiny-sd3", **groups({**window, "timestep_window_latest_start": 3}))
    rng, before = np.random.default_rng(0), np.random.default_rng(0)
    assert [draw_window(old.ddpo, rng).start for _ in range(50)] == [int(before.integers(4)) for _ in range(50)]
    with pytest.raises(ValidationError, match=r"ddpo.timestep_window_earliest_start \(3\) must not exceed"):
        Config(
            preset="tiny-sd3",
            **groups({**window, "timestep_window_earliest_start": 3, "timestep_window_latest_start": 1}),
        )


@pytest.mark.parametrize(
    "train",
    [
        {"timestep_fraction": 1.0},
        {"timestep_fraction": 0.3, "timestep_selection": "random"},  # 3 random steps of 10: the last among them
        {"timestep_fraction": 1.0, "timestep_selection": "first"},
        {"timestep_window": 5, "timestep_window_latest_start": 5, "timestep_fraction": 1.0},
    ],
)
def test_cps_refuses_to_train_its_last_step(train):
    with pytest.raises(
        ValidationError, match=r"sample.sde_type cps: its last step \(9\) .* train.timestep_fraction"
    ) as raised:
        Config(**cps(**train))
    assert "--train.timestep_selection first --train.timestep_fraction 0.9" in str(raised.value)


@pytest.mark.parametrize(
    "train",
    [
        {"timestep_fraction": 0.99, "timestep_selection": "first"},
        {"timestep_window": 3, "timestep_window_latest_start": 2, "timestep_fraction": 1.0},
        {
            "timestep_window": 5,
            "timestep_window_latest_start": 5,
            "timestep_fraction": 0.8,
            "timestep_selection": "first",
        },
    ],
)
def test_cps_accepts_windows_and_fractions_that_leave_the_last_step_out(train):
    assert Config(**cps(**train)).sample.sde_type == "cps"


@pytest.mark.parametrize(
    "name, steps",
    [
        ("tiny-sd3", range(9)),
        ("sd3-geneval", range(9)),
        ("sd3-ocr", range(9)),
        ("sd3-pickscore", range(9)),
        ("sd3-pickscore-fast", range(5)),
    ],
)
def test_flow_grpo_presets_train_the_steps_flow_grpo_trains(name, steps):
    assert trainable_steps(Config(preset=name)) == steps


def test_eta_zero_is_refused_for_ddpo_only():
    with pytest.raises(ValidationError, match="sample.eta 0 makes every sampler step deterministic"):
        Config(sample={"eta": 0.0})
    Config(algorithm="refl", sample={"eta": 0.0}, reward={"scorer": "aesthetic"})  # ReFL samples deterministically


def test_the_command_line_refuses_with_exit_2_and_no_traceback(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer",
            "--preset",
            "tiny-sd3",
            "--sample.sde_type",
            "cps",
            "--train.timestep_selection",
            "random",
            "--run.output_dir",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "its last step (9)" in done.stderr and "--train.timestep_selection first" in done.stderr
    assert not (tmp_path / "o").exists()


def test_first_selection_trains_each_samples_first_stored_steps():
    from trainer.sampling import Trajectories

    batch = Trajectories(
        prompt_embeds=torch.zeros(6, 1),
        path=torch.zeros(6, 11, 1),
        log_probs=torch.zeros(6, 10),
        timesteps=torch.zeros(6, 10),
        steps=torch.arange(10).repeat(6, 1),
    )
    picks = batch.shuffled(4, 9, "first")
    assert sorted(torch.cat([rows for rows, _ in picks]).tolist()) == list(range(6))
    assert all(steps.tolist() == [list(range(9))] * len(rows) for rows, steps in picks)
    random = torch.cat([steps for _, steps in batch.shuffled(6, 9)])
    assert len({tuple(r.tolist()) for r in random}) > 1  # ddpo-pytorch's: a permutation per sample


def _tiny_copy(tmp_path, tiny_cache, **scheduler) -> str:
    """The tiny SD1 pipeline's model_index.json and scheduler only: no weights to load."""
    from trainer.families.tiny_pipeline import tiny_pipeline_path

    source, copy = tiny_pipeline_path(tiny_cache), tmp_path / "pipeline"
    (copy / "scheduler").mkdir(parents=True)
    shutil.copy(source / "model_index.json", copy)
    config = json.loads((source / "scheduler" / "scheduler_config.json").read_text())
    (copy / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, **scheduler}))
    return str(copy)


def test_a_ddim_schedule_ending_on_alpha_one_is_refused_before_weights_load(tmp_path, tiny_cache):
    from trainer.preflight import PreflightError, check

    model = _tiny_copy(tmp_path, tiny_cache, set_alpha_to_one=True)  # no weights in the folder at all
    cfg = Config(pretrained={"model": model}, train={"timestep_fraction": 1.0})
    with pytest.raises(PreflightError, match=r"gives step 19 of 20 a std of 0 .* \"set_alpha_to_one\": false"):
        check(cfg, 1, "cpu")
    fixed = Config(pretrained={"model": model}, train={"timestep_fraction": 0.95, "timestep_selection": "first"})
    # check returns the batch plan or raises: what the plan holds is the answer, here the steps trained
    assert check(fixed, 1, "cpu").train_timesteps == 19  # all but the zero-noise last step
    default = Config(
        pretrained={"model": _tiny_copy(tmp_path / "default", tiny_cache)}, train={"timestep_fraction": 1.0}
    )
    assert check(default, 1, "cpu").train_timesteps == 20  # SD1's own schedule (set_alpha_to_one false): all noisy


@pytest.mark.parametrize(
    "total,k,edges", [(20, 4, [1, 5, 9, 13, 18]), (10, 3, [1, 3, 6, 9]), (14, 6, [1, 2, 4, 6, 8, 10, 12])]
)
def test_stratified_selection_draws_one_step_per_stratum(total, k, edges):
    """AWM's stratified timesteps (its discrete_wo_init, scxue/advantage_weighted_matching train_sd3_awm.py):
    sample i's j-th step is uniform over stratum j, [edges[j], edges[j + 1]), the edges float32
    linspace(1, int(0.9 total), k + 1) truncated (worked out by hand here); the pure-noise step 0 is never
    drawn. At AWM's 14 steps and 6 timesteps: [1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]."""
    from trainer.sampling import pick_steps, shared_steps

    torch.manual_seed(0)
    steps = pick_steps(4000, total, k, "stratified", span=0.9)
    assert steps.shape == (4000, k) and steps.min() >= 1
    for j in range(k):
        counts = torch.bincount(steps[:, j], minlength=total)
        inside = counts[edges[j] : edges[j + 1]]
        assert counts.sum() == inside.sum() and (inside > 0).all()  # every step of the stratum, none outside
        if len(inside) > 1:
            assert inside.float().std() / inside.float().mean() < 0.15  # uniform within it (4000 draws)
    batch = shared_steps(steps[:3], shared=True)  # train.timestep_shared: the batch's first draw for all
    assert torch.equal(batch, steps[:1].repeat(3, 1)) and torch.equal(shared_steps(steps[:3], False), steps[:3])
    assert (pick_steps(3, total, k, "first") == torch.arange(k)).all()
    random = pick_steps(200, total, k)
    assert all(len(set(row.tolist())) == k for row in random) and random.max() == total - 1
