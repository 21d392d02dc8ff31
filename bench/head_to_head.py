"""Methods head to head on the shapes world, as the papers compare them: the same training budget per run,
several training seeds, and the CPU-minutes each method needs to reach the same gain on its training captions.

    python -m bench.head_to_head --compare shapes-sd3-grpo=62,shapes-sd3-nft=100 --seeds 1,2,3 \\
        --out outputs/head_to_head.jsonl [trainer settings for every run, e.g. --run.cpu_threads 1]

Each ``preset=epochs`` is trained once per seed (the seeds outer, so the presets share the machine's moods),
evaluated ``--evals`` times during training on the training captions (shapes_eval_seen.txt, the trainer's own
evaluation, not counted as training time) and once after on the held-out ones. One JSON line per run is
appended to ``--out``; runs already there are not trained again, so an interrupted comparison resumes. The last
line printed is the summary: per preset, the mean over seeds of the seen and held-out change with its standard
error across seeds, points per CPU-minute, and the CPU-minutes to the smaller of the presets' mean seen gains
on their seed-averaged curves (DiffusionNFT's and AWM's "x times more efficient" are this ratio, wall-clock to
a reward level). CPU-minutes are the epochs' seconds times the torch threads they ran with.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from bench.learning import accuracy_change, bench_config, shapes_change
from trainer import train
from trainer.prompts import ASSETS

SEEN, HELDOUT = ASSETS / "shapes_eval_seen.txt", ASSETS / "shapes_eval.txt"


def one_run(preset: str, epochs: int, seed: int, evals: int, args: list[str]) -> dict:
    if epochs % evals:
        raise SystemExit(f"--compare {preset}={epochs}: the epochs must be a multiple of --evals {evals}")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = bench_config(
            [
                "--preset",
                preset,
                "--run.seed",
                str(seed),
                "--run.num_epochs",
                str(epochs),
                "--run.eval_every",
                str(epochs // evals),
                "--prompt.eval_path",
                str(SEEN),
                "--run.log_images_every",
                "0",
                *args,
            ],
            tmp,
        )
        history = train(cfg)
        records = [json.loads(line) for line in (Path(tmp) / "eval.jsonl").read_text().splitlines()]
        heldout = shapes_change(cfg, Path(tmp), HELDOUT)
    cpu_seconds = np.cumsum([0.0] + [m["seconds_epoch"] * m["cpu_threads"] for m in history])
    seen = accuracy_change(records[0], records[-1])
    minutes = cpu_seconds[-1] / 60
    return {
        "benchmark": "head_to_head",
        "preset": preset,
        "seed": seed,
        "epochs": epochs,
        "settings": args,
        "cpu_threads": sorted({m["cpu_threads"] for m in history}),
        "training_cpu_minutes": round(minutes, 2),
        "curve": [
            {
                "epoch": r["epoch"],
                "cpu_minutes": round(cpu_seconds[r["epoch"]] / 60, 2),
                "seen_accuracy": round(100 * r["accuracy"], 2),
            }
            for r in records
        ],
        "seen": seen | {"points_per_cpu_minute": round(seen["rise_points"] / minutes, 3)},
        "heldout": heldout | {"points_per_cpu_minute": round(heldout["rise_points"] / minutes, 3)},
    }


def minutes_to(curve: list[tuple[float, float]], gain: float) -> float | None:
    """The first CPU-minute at which the piecewise-linear (minutes, gain) curve, 0 at its start, reaches
    ``gain`` > 0."""
    for (m0, g0), (m1, g1) in zip(curve, curve[1:]):
        if g0 < gain <= g1:
            return m0 + (gain - g0) / (g1 - g0) * (m1 - m0)
    return None


def mean_se(values: list[float]) -> dict:
    x = np.asarray(values, dtype=float)
    return {
        "mean": round(float(x.mean()), 2),
        "standard_error": round(float(x.std(ddof=1) / np.sqrt(len(x))), 2) if len(x) > 1 else None,
    }


def summary(runs: list[dict], presets: list[str]) -> dict:
    """Per preset over its seeds; then the time of each to the smaller mean seen gain, and the first preset's
    time over each one's (above 1: that preset got there faster)."""
    per = {}
    for preset in presets:
        mine = [r for r in runs if r["preset"] == preset]
        curves = np.array(
            [
                [(p["cpu_minutes"], p["seen_accuracy"] - r["curve"][0]["seen_accuracy"]) for p in r["curve"]]
                for r in mine
            ]
        )  # (seeds, evaluations, 2): the seeds share the evaluation epochs
        minutes = np.mean([r["training_cpu_minutes"] for r in mine])
        change = {where: [r[where]["rise_points"] for r in mine] for where in ("seen", "heldout")}
        per[preset] = {
            "seeds": [r["seed"] for r in mine],
            "training_cpu_minutes": mean_se([r["training_cpu_minutes"] for r in mine]),
            **{f"{where}_change": mean_se(points) for where, points in change.items()},
            **{
                f"{where}_points_per_cpu_minute": round(float(np.mean(points) / minutes), 3)
                for where, points in change.items()
            },
            "seen_curve": [(round(m, 2), round(g, 2)) for m, g in curves.mean(axis=0)],
        }
    target = min(p["seen_change"]["mean"] for p in per.values())
    result = {"benchmark": "head_to_head_summary", "presets": per, "same_seen_gain": target}
    if target <= 0:
        result["time_to_same_seen_gain"] = f"undefined: a preset's mean seen change is {target:+.2f} points"
        return result
    times = {preset: minutes_to(p["seen_curve"], target) for preset, p in per.items()}
    result["cpu_minutes_to_same_seen_gain"] = {k: None if v is None else round(v, 2) for k, v in times.items()}
    first = times[presets[0]]  # the papers' "x times more efficient": the first preset's time over each one's
    result[f"speedup_over_{presets[0]}"] = {k: round(first / v, 2) for k, v in times.items() if v and first}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", required=True, help="preset=epochs,preset=epochs,...")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--evals", type=int, default=3, help="evaluations on the training captions after the first")
    parser.add_argument("--out", type=Path, default=Path("outputs/head_to_head.jsonl"))
    known, args = parser.parse_known_args()
    plan = [(p, int(e)) for p, e in (item.split("=") for item in known.compare.split(","))]
    seeds = [int(s) for s in known.seeds.split(",")]
    done = [json.loads(line) for line in known.out.read_text().splitlines()] if known.out.exists() else []
    known.out.parent.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        for preset, epochs in plan:
            if any(r["preset"] == preset and r["seed"] == seed and r["epochs"] == epochs for r in done):
                continue
            record = one_run(preset, epochs, seed, known.evals, args)
            with known.out.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)
            done.append(record)
    runs = [r for r in done if (r["preset"], r["epochs"]) in plan and r["seed"] in seeds]
    print(json.dumps(summary(runs, [p for p, _ in plan])))


if __name__ == "__main__":
    main()
