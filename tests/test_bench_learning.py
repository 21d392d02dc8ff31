"""bench.learning's and bench.head_to_head's arithmetic, against numbers worked by hand."""

from __future__ import annotations

import math

from bench.head_to_head import minutes_to, summary
from bench.learning import accuracy_change, bench_config, shapes_change


def _record(scores: dict[str, list[float]], categories: dict[str, float]) -> dict:
    return {
        "reward_mean": 0.5,
        "per_prompt": [{"prompt": p, "reward_shapes": s} for p, s in scores.items()],
        **{f"category/{c}/accuracy": a for c, a in categories.items()},
    }


def test_accuracy_change_is_the_paired_per_image_difference():
    # four images; only full marks count as correct: before 1 0 0 1, after 1 1 0 0 -> differences 0 +1 0 -1
    before = _record({"a circle": [1.0, 0.5], "two squares": [0.0, 1.0]}, {"counting": 0.5})
    after = _record({"a circle": [1.0, 1.0], "two squares": [0.0, 0.0]}, {"counting": 0.0})
    change = accuracy_change(before, after)
    se = 100 * math.sqrt((0 + 1 + 0 + 1) / 3) / 2  # the sample std of (0, 1, 0, -1) over sqrt(4): 40.82
    assert (change["accuracy_before"], change["accuracy_after"], change["rise_points"]) == (50.0, 50.0, 0.0)
    assert change["rise_standard_error"] == round(se, 2) and change["per_category"] == {
        "counting": {"before": 50.0, "after": 0.0}
    }


def test_seen_change_only_for_runs_in_the_shapes_world(tmp_path):
    assert shapes_change(bench_config(["--preset", "tiny"], str(tmp_path)), tmp_path) is None


def test_minutes_to_a_gain_interpolates_the_first_crossing():
    curve = [(0.0, 0.0), (5.0, 2.0), (10.0, 1.0), (15.0, 6.0)]
    assert minutes_to(curve, 1.0) == 2.5  # halfway up the first segment
    assert minutes_to(curve, 4.0) == 13.0  # 10 + (4 - 1) / (6 - 1) * 5: past the dip
    assert minutes_to(curve, 7.0) is None


def _run(preset: str, seed: int, curve: list[tuple[float, float]], heldout: float) -> dict:
    minutes = curve[-1][0]
    return {
        "preset": preset,
        "seed": seed,
        "training_cpu_minutes": minutes,
        "curve": [{"cpu_minutes": m, "seen_accuracy": 40.0 + g} for m, g in curve],
        "seen": {"rise_points": curve[-1][1]},
        "heldout": {"rise_points": heldout},
    }


def test_head_to_head_summary_times_both_methods_to_the_smaller_mean_seen_gain():
    runs = [
        _run("a", 1, [(0, 0), (10, 2), (20, 4)], 1.0),
        _run("a", 2, [(0, 0), (10, 4), (20, 8)], 3.0),
        _run("b", 1, [(0, 0), (5, 6), (10, 12)], -1.0),
        _run("b", 2, [(0, 0), (5, 2), (10, 8)], 1.0),
    ]
    result = summary(runs, ["a", "b"])
    a, b = result["presets"]["a"], result["presets"]["b"]
    assert a["seen_change"] == {"mean": 6.0, "standard_error": 2.0}  # (4, 8): std 2.83 / sqrt 2
    assert b["heldout_change"] == {"mean": 0.0, "standard_error": 1.0}
    assert a["seen_curve"] == [(0, 0), (10, 3), (20, 6)] and b["seen_curve"] == [(0, 0), (5, 4), (10, 10)]
    assert a["seen_points_per_cpu_minute"] == 0.3 and b["seen_points_per_cpu_minute"] == 1.0
    # the smaller mean seen gain is a's 6: a reaches it at 20 minutes, b at 5 + (6 - 4) / 6 * 5 = 6.67
    assert result["same_seen_gain"] == 6.0
    assert result["cpu_minutes_to_same_seen_gain"] == {"a": 20.0, "b": 6.67}
    assert result["speedup_over_a"] == {"a": 1.0, "b": 3.0}


def test_head_to_head_has_no_time_ratio_when_a_method_lost_ground():
    runs = [_run("a", 1, [(0, 0), (10, 2)], 0.0), _run("b", 1, [(0, 0), (10, -1)], 0.0)]
    assert summary(runs, ["a", "b"])["time_to_same_seen_gain"].startswith("undefined")


def test_ceiling_measures_against_numbers_worked_by_hand():
    """bench.ceiling on rendered images: caption A (2 lines in the file) with samples correct, wrong, and B (1
    line) with none correct; A's two samples are one picture drawn twice (one layout), B's two pictures."""
    from collections import Counter

    import numpy as np

    from bench.ceiling import layout, measure
    from scorers import world

    a, b = "a red circle", "a blue square"
    one, other = world.render(b, 0), world.render(b, 1)
    assert layout(one) != layout(other) and [o[:2] for o in layout(world.render(a, 3))] == [("red", "circle")]
    images = np.stack([world.render(a, 3), world.render(a, 3), one, other])
    correct = np.array([True, False, False, False])
    result = measure(images, correct, [a, b], 2, Counter([a, a, b]), {a: "single_object", b: "colors"}.get)
    # accuracy: A 50% (weight 2), B 0% (weight 1) -> 33.3; best of 2: A yes, B no -> 66.7; layouts 1/2 and 2/2
    assert (result["accuracy"], result["best_of_n"], result["distinct_layouts"]) == (33.3, 66.7, 75.0)
    assert result["per_category"]["colors"] == {"accuracy": 0.0, "best_of_n": 0.0, "distinct_layouts": 100.0}
