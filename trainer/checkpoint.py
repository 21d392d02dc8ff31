"""Checkpoints that resume exactly: trainable weights, optimizer, scaler, RNG streams, counters, stat tracker.

(Exactly, unless reward.overlap is next_epoch: the samples drawn ahead are not saved and are redrawn.)

Layout: ``<output_dir>/checkpoints/checkpoint-<epochs done>/``. A checkpoint is written into a hidden staging
folder and renamed into place only when every process has written its part, so a run killed mid-save
leaves no folder that ``latest`` would pick. Only the newest ``keep`` checkpoints stay. Nothing is pickled:
tensors go to safetensors, the rest to JSON; the optimizer's state dict goes through
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PREFIX = "checkpoint-"


def latest(path: Path) -> Path | None:
    """``path`` itself if it is a checkpoint, else the newest complete checkpoint of the run folder ``path``."""
    path = Path(path)
    if (path / "state.json").exists():
        return path
    done = sorted((p for p in (path / "checkpoints").glob(f"{PREFIX}*") if (p / "state.json").exists()),
                  key=lambda p: int(p.name.removeprefix(PREFIX)))
    return done[-1] if done else None


def rng_state(prompt_rng: np.random.Generator) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    return tensors, {"python": random.getstate(), "numpy_prompts": prompt_rng.bit_generator.state}


def set_rng_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any], prompt_rng: np.random.Generator) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))
    prompt_rng.bit_generator.state = plain["numpy_prompts"]


def save(accelerator, out: Path, epoch: int, keep: int, *, params: dict[str, torch.Tensor], optimizer,
         state: dict[str, Any], prompt_rng: np.random.Generator, ema=None) -> Path:
    """Collective: every process calls it. ``epoch`` counts the epochs completed."""
    root = out / "checkpoints"
    staging, final = root / f".staging-{PREFIX}{epoch}", root / f"{PREFIX}{epoch}"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()

    rank = accelerator.process_index
    tensors, plain = rng_state(prompt_rng)  # every process has its own streams
    save_file(tensors, str(staging / f"rng-{rank}.safetensors"))
    (staging / f"rng-{rank}.json").write_text(json.dumps(plain))
    if accelerator.is_main_process:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in params.items()}, str(staging / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
        if ema is not None:
            save_file(ema.shadow, str(staging / "ema.safetensors"))
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), staging / "scaler.pt")
        (staging / "state.json").write_text(json.dumps({**state, "epoch": epoch}))  # written last: marks complete
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        done = sorted((p for p in root.glob(f"{PREFIX}*")), key=lambda p: int(p.name.removeprefix(PREFIX)))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load(accelerator, path: Path, *, params: dict[str, torch.Tensor], optimizer,
         prompt_rng: np.random.Generator, ema=None) -> dict[str, Any]:
    """Restore everything ``save`` wrote; returns the plain state (epoch, global_step, tracker, ...)."""
    weights = load_file(str(path / "trainable.safetensors"))
    missing = set(params) - set(weights)
    if missing:
        raise ValueError(f"run.resume_from: {path} lacks {len(missing)} trainable tensors (e.g. {sorted(missing)[0]}); "
                         "was it written with the same model and LoRA settings?")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(weights[name])
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    if ema is not None:
        if not (path / "ema.safetensors").exists():
            raise ValueError(f"run.resume_from: {path} has no EMA weights; it was written with train.ema_decay 0")
        ema.shadow = {k: v.to(params[k].device) for k, v in load_file(str(path / "ema.safetensors")).items()}
    if accelerator.scaler is not None and (path / "scaler.pt").exists():
        accelerator.scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    rank = accelerator.process_index
    if not (path / f"rng-{rank}.json").exists():
        raise ValueError(f"run.resume_from: {path} was written by fewer processes than this run has ({rank + 1}+)")
    set_rng_state(load_file(str(path / f"rng-{rank}.safetensors")), json.loads((path / f"rng-{rank}.json").read_text()), prompt_rng)
    return json.loads((path / "state.json").read_text())
