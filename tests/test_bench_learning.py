"""bench.learning's before/after arithmetic, against numbers worked by hand."""

from __future__ import annotations

import math

from bench.learning import accuracy_change, bench_config, shapes_change


def _record(scores: dict[str, list[float]], categories: dict[str, float]) -> dict:
    return {"reward_mean": 0.5, "per_prompt": [{"prompt": p, "reward_shapes": s} for p, s in scores.items()],
            **{f"category/{c}/accuracy": a for c, a in categories.items()}}


def test_accuracy_change_is_the_paired_per_image_difference():
    # four images; only full marks count as correct: before 1 0 0 1, after 1 1 0 0 -> differences 0 +1 0 -1
    before = _record({"a circle": [1.0, 0.5], "two squares": [0.0, 1.0]}, {"counting": 0.5})
    after = _record({"a circle": [1.0, 1.0], "two squares": [0.0, 0.0]}, {"counting": 0.0})
    change = accuracy_change(before, after)
    se = 100 * math.sqrt((0 + 1 + 0 + 1) / 3) / 2  # the sample std of (0, 1, 0, -1) over sqrt(4): 40.82
    assert (change["accuracy_before"], change["accuracy_after"], change["rise_points"]) == (50.0, 50.0, 0.0)
    assert change["rise_standard_error"] == round(se, 2) and change["per_category"] == {"counting": {"before": 50.0, "after": 0.0}}


def test_seen_change_only_for_runs_evaluated_on_the_held_out_captions(tmp_path):
    assert shapes_change(bench_config(["--preset", "tiny"], str(tmp_path)), tmp_path) is None
