"""ReFL, DRaFT-1 and AlignProp on the shapes world, and a served reward's step time against an in-process one.

    python -m bench.refl [--steps 60] [--modes refl,draft,alignprop] [--timing-steps 6] [trainer options]

Learning: each mode trains tiny-shapes (preset ``shapes-refl``: LoRA, the tiny CLIP's CLIP score as the
differentiable reward) for ``--steps`` optimizer steps from the same base model, and is evaluated before and
after by the shapes verifier on the held-out captions (``run.eval_scorer shapes``): accuracy change with its
paired standard error, per category, and the reward of the first and last five steps. DDPO's and DPO's
figures on the same world come from ``bench.learning`` and ``bench.dpo``.

Timing: the same ReFL step (rollout, decode, reward, backward) with the reward in process and with the
reward on a real ``reward-server`` subprocess on 127.0.0.1 (``/v1/score_grad``), interleaved, median seconds
per step and their ratio. Both share this machine's cores; on GPUs the server has its own.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydantic_settings import CliApp

from bench.learning import accuracy_change, shapes_change
from trainer.config import Config


def learn(mode: str, steps: int, extra: list[str]) -> dict:
    from trainer.algorithms.refl.loop import train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = CliApp.run(
            Config,
            cli_args=[
                "--preset",
                "shapes-refl",
                "--refl.mode",
                mode,
                "--refl.max_train_steps",
                str(steps),
                "--run.eval_every",
                str(steps),
                "--run.output_dir",
                tmp,
                "--run.log_with",
                "none",
                *extra,
            ],
        )
        start = time.perf_counter()
        history = train(cfg)
        wall = time.perf_counter() - start
        evals = [json.loads(line) for line in (Path(tmp) / "eval.jsonl").read_text().splitlines()]
        seen = shapes_change(cfg, Path(tmp))
    change = accuracy_change(evals[0], evals[-1])
    k = min(5, len(history))
    return {
        "benchmark": "refl",
        "mode": mode,
        "steps": steps,
        "wall_seconds": round(wall, 1),
        "config": cfg.model_dump(mode="json", include={"train", "refl"}),
        "heldout": {**change, "points_per_minute": round(change["rise_points"] / (wall / 60), 2)},
        "seen": seen,
        "clip_reward_first_steps": round(float(np.mean([m["reward_mean"] for m in history[:k]])), 3),
        "clip_reward_last_steps": round(float(np.mean([m["reward_mean"] for m in history[-k:]])), 3),
        "seconds_per_step": round(float(np.median([m["seconds_step"] for m in history])), 3),
    }


def _server(port: int, log: Path) -> subprocess.Popen:
    import httpx

    exe = shutil.which("reward-server", path=str(Path(sys.executable).parent)) or "reward-server"
    proc = subprocess.Popen(
        [
            exe,
            "--model",
            "clipscore",
            "--checkpoint",
            "tiny-shapes",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
    )
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError(log.read_text())


def timing(steps: int) -> dict:
    """Median seconds of one ReFL step (batch 8, the preset's) with the reward local and remote, interleaved."""
    import torch

    from trainer import run as run_setup
    from trainer.algorithms.refl.loop import differentiable_reward, rollout

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        server = _server(port, Path(tmp) / "server.log")
        try:
            runs = {}
            for where in ("local", "remote"):
                cfg = Config(preset="shapes-refl", run={"output_dir": Path(tmp) / where, "log_with": "none"})
                if where == "remote":
                    cfg.reward.url, cfg.reward.options = [f"http://127.0.0.1:{port}"], {}
                stack = run_setup.started(cfg, 1)
                run = stack.__enter__()
                trained = run_setup.load_model(run, 1)
                runs[where] = (stack, run, trained, differentiable_reward(run))
            seconds = {"local": [], "remote": []}
            prompts = ["a red circle left of a blue square"] * cfg.train.batch_size
            for i in range(steps + 1):
                for where, (_, run, trained, reward) in runs.items():
                    start = time.perf_counter()
                    x0, _ = rollout(run, trained, prompts, 64, None)
                    loss = (
                        torch.relu(cfg.refl.margin - reward(trained.family.vae.decode(x0), prompts)).mean()
                        * cfg.refl.grad_scale
                    )
                    loss.backward()
                    trained.optimizer.zero_grad()
                    if i:  # the first of each is a warm-up
                        seconds[where].append(time.perf_counter() - start)
            for stack, *_ in runs.values():
                stack.__exit__(None, None, None)
        finally:
            server.terminate()
            server.wait(30)
    local, remote = (float(np.median(seconds[w])) for w in ("local", "remote"))
    return {
        "benchmark": "refl_remote_vs_local",
        "steps": steps,
        "batch": cfg.train.batch_size,
        "seconds_per_step_local": round(local, 3),
        "seconds_per_step_remote": round(remote, 3),
        "remote_over_local": round(remote / local, 3),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--modes", default="refl,draft,alignprop")
    parser.add_argument("--timing-steps", type=int, default=6)
    args, extra = parser.parse_known_args(argv)
    if args.timing_steps:
        print(json.dumps(timing(args.timing_steps)), flush=True)
    for mode in filter(None, args.modes.split(",")):
        print(json.dumps(learn(mode, args.steps, extra)), flush=True)


if __name__ == "__main__":
    main()
