"""Diffusion-DPO on the shapes world: offline DPO on verifier-labelled pairs, SFT on their winners, and online
DPO, with held-out verifier accuracy before and after each (the same evaluation as bench/learning.py).

    python -m bench.dpo [--pairs 512] [--images_per_prompt 2] [--steps 60] [--eval_every N]
                        [--modes offline,sft,online] [--dpo.beta 5000 ...]

First labels ``--pairs`` pairs (samples of tiny-shapes per training caption, deterministic DDIM, the
verifier choosing the best and the worst of ``--images_per_prompt``; ties dropped) with ``python -m
trainer.label``, timed on its own; then trains each mode for ``--steps`` optimizer steps from the same base
model and prints one JSON line per mode: wall seconds of training, the held-out accuracy change (points,
standard error, per category), points per minute, the same change on training captions (``seen``), and
with ``--eval_every`` the change at every evaluation (``curve``). Other arguments are trainer settings for
every mode (``--train.learning_rate 1e-4``). DDPO's figure on the same world comes from ``python -m
bench.learning``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from pydantic_settings import CliApp

from bench.learning import accuracy_change, shapes_change
from trainer.config import Config

# DPO on tiny-shapes: LoRA as the DDPO default run, batches of 8 pairs, evaluated on the held-out captions.
DPO_SHAPES = [
    "--preset",
    "shapes",
    "--algorithm",
    "dpo",
    "--train.batch_size",
    "8",
    "--train.gradient_accumulation_steps",
    "1",
    "--train.learning_rate",
    "1e-4",
    "--dpo.proportion_empty_prompts",
    "0.1",
    "--no-dpo.hflip",
    "--sample.num_steps",
    "20",
    "--sample.batch_size",
    "32",
]


def label_pairs(out: Path, pairs: int, images_per_prompt: int = 2) -> dict:
    from trainer.tools.label import LabelSettings, label

    start = time.perf_counter()
    counts = label(
        LabelSettings(
            out=out,
            model="tiny-shapes",
            prompt_fn="shapes",
            pairs=pairs,
            scorer="shapes",
            batch_size=32,
            seed=1,
            images_per_prompt=images_per_prompt,
        )
    )
    return {**counts, "seconds": round(time.perf_counter() - start, 1)}


def run_mode(mode: str, data: Path, steps: int, extra: list[str], eval_every: int | None = None) -> dict:
    from trainer.algorithms.dpo.loop import train

    with tempfile.TemporaryDirectory() as tmp:
        flags = {"offline": [], "sft": ["--dpo.sft"], "online": ["--dpo.online"]}[mode]
        cfg = CliApp.run(
            Config,
            cli_args=[
                *DPO_SHAPES,
                "--dpo.dataset",
                str(data),
                "--dpo.max_train_steps",
                str(steps),
                "--run.eval_every",
                str(eval_every or steps),
                "--dpo.checkpointing_steps",
                "0",
                "--run.output_dir",
                tmp,
                "--run.log_with",
                "none",
                *flags,
                *extra,
            ],
        )
        start = time.perf_counter()
        history = train(cfg)
        wall = time.perf_counter() - start
        evals = [json.loads(line) for line in (Path(tmp) / "eval.jsonl").read_text().splitlines()]
        seen = shapes_change(cfg, Path(tmp))
    change = accuracy_change(evals[0], evals[-1])
    last = history[-min(5, len(history)) :]
    return {
        "benchmark": "dpo",
        "mode": mode,
        "steps": steps,
        "wall_seconds": round(wall, 1),
        "config": cfg.model_dump(mode="json", include={"train", "dpo"}),
        "heldout": {**change, "points_per_minute": round(change["rise_points"] / (wall / 60), 2)},
        "seen": seen,
        "curve": [
            {
                "step": e["epoch"],
                **{
                    k: v for k, v in accuracy_change(evals[0], e).items() if k in ("rise_points", "rise_standard_error")
                },
            }
            for e in evals[1:]
        ],
        "last_steps": {
            k: round(sum(m[k] for m in last) / len(last), 4)
            for k in ("loss", "implicit_accuracy", "model_mse_winner", "data_wait_share")
            if k in last[0]
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--images_per_prompt", type=int, default=2, help="best vs worst of this many per prompt")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--modes", default="offline,sft,online")
    parser.add_argument("--data", type=Path, default=None, help="reuse pairs labelled before (a folder)")
    parser.add_argument("--eval_every", type=int, default=None, help="evaluate every this many steps (the curve)")
    args, extra = parser.parse_known_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or Path(tmp) / "pairs"
        if args.data is None or not any(data.glob("*.parquet")):
            labelled = label_pairs(data, args.pairs, args.images_per_prompt)
            print(json.dumps({"benchmark": "dpo", "labelled": labelled}), flush=True)
        for mode in args.modes.split(","):
            print(json.dumps(run_mode(mode, data, args.steps, extra, args.eval_every)), flush=True)


if __name__ == "__main__":
    main()
