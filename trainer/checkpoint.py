"""Checkpoints that resume exactly: trainable weights, optimizer, scaler, RNG streams, counters, stat tracker.

(Exactly, unless reward.overlap is next_epoch: the samples drawn ahead are not saved and are redrawn.)

Layout: ``<output_dir>/checkpoints/checkpoint-<epochs done>/``. A checkpoint is written into a hidden staging
folder and renamed into place only when every process has written its part, so a run killed mid-save
leaves no folder that ``resolve`` would pick. Only the newest ``keep`` checkpoints stay. Nothing is pickled:
tensors go to safetensors, the rest to JSON; the optimizer's state dict goes through
``torch.load(weights_only=True)``. A sharded run (run.sharding) writes its weights, optimizer state, EMA and
lagging weights with torch.distributed.checkpoint into ``sharded/``, every process its own shards, readable
on any number of processes (trainer/sharding.py).

The rename does not protect against a file truncated later (a full disk, an interrupted copy, a crash
before the data reached the disk), so ``manifest.json`` (every file's size and sha256) is written last and
``resolve`` checks it before anything is loaded. Checkpoints written before manifests existed are checked
by parsing each file (safetensors header, zip CRCs, JSON) instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

from trainer.sharding import any_sharded

PREFIX = "checkpoint-"
SHARDED = "sharded"  # a sharded run's torch.distributed.checkpoint folder inside a checkpoint
MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    pass


def _is_checkpoint(path: Path) -> bool:
    return (path / "state.json").exists() or (path / MANIFEST).exists() or path.name.startswith(PREFIX)


def newest_first(run: Path) -> list[Path]:
    found = [p for p in (run / "checkpoints").glob(f"{PREFIX}*") if p.name.removeprefix(PREFIX).isdigit()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(PREFIX)), reverse=True)


def resolve(path: Path, warn: Callable[[str], None] = print) -> Path:
    """The checkpoint to resume from: ``path`` itself if it names one (which must verify), else the newest
    checkpoint of the run folder ``path`` that verifies, warning about each damaged one passed over."""
    path = Path(path)
    if _is_checkpoint(path):
        problem = verify(path)
        if problem is not None:
            raise CheckpointError(f"run.resume_from: checkpoint {path} is damaged: {problem}")
        return path
    skipped = []
    for candidate in newest_first(path):
        problem = verify(candidate)
        if problem is None:
            if skipped:
                warn(f"WARNING: resuming from the older checkpoint {candidate}, the newest good one")
            return candidate
        skipped.append(f"{candidate}: {problem}")
        warn(f"WARNING: checkpoint {candidate} is damaged and is skipped: {problem}")
    raise CheckpointError(
        f"run.resume_from: no usable checkpoint under {path}" + "".join(f"\n  {line}" for line in skipped)
    )


def verify(path: Path) -> str | None:
    """None if the checkpoint at ``path`` is whole, else what is wrong, naming the file."""
    if not (path / "state.json").exists():
        return f"{path / 'state.json'} is missing (not a complete checkpoint)"
    if not (path / MANIFEST).exists():
        return _parses(path)
    try:
        listed = json.loads((path / MANIFEST).read_text())["files"]
    except (ValueError, KeyError, TypeError) as exc:
        return f"{path / MANIFEST} is unreadable ({exc})"
    for name, expected in sorted(listed.items()):
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        size = file.stat().st_size
        if size != expected["size"]:
            return f"{file} has {size} bytes, the manifest says {expected['size']}"
        if _sha256(file) != expected["sha256"]:
            return f"{file} does not match its sha256 in the manifest"
    return None


def _parses(path: Path) -> str | None:
    """The check for a checkpoint without a manifest: each file opens as what it claims to be."""
    from safetensors import safe_open

    for file in sorted(path.iterdir()):
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), "pt"):  # checks the header covers the file exactly
                    pass
            elif file.suffix == ".pt":
                with zipfile.ZipFile(file) as archive:  # torch.save's format; testzip checks every CRC
                    bad = archive.testzip()
                if bad is not None:
                    return f"{file} is corrupt (zip member {bad})"
            elif file.suffix == ".json":
                json.loads(file.read_text())
        except Exception as exc:  # noqa: BLE001 - any failure to parse means the file is damaged
            return f"{file} is damaged ({type(exc).__name__}: {exc})"
    return None


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _write_manifest(folder: Path) -> None:
    """Every file's size and hash, written (and synced) after they all are, before the folder is renamed:
    after a crash, data that never reached the disk shows as a mismatch instead of a loadable-looking file."""
    files = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):  # a sharded checkpoint's shards included
        with open(file, "rb") as f:
            os.fsync(f.fileno())
        files[str(file.relative_to(folder))] = {"size": file.stat().st_size, "sha256": _sha256(file)}
    with open(folder / MANIFEST, "w") as f:
        json.dump({"files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


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


def save(
    accelerator,
    out: Path,
    epoch: int,
    keep: int,
    *,
    params: dict[str, torch.Tensor],
    optimizer,
    state: dict[str, Any],
    prompt_rng: np.random.Generator,
    ema=None,
    rng: tuple | None = None,
    old_policy=None,
    model: torch.nn.Module | None = None,
) -> Path:
    """Collective: every process calls it. ``epoch`` counts the epochs completed. ``rng``: the streams as
    ``rng_state`` took them when the epoch ended, if they have moved on since (a save after Ctrl-C).
    ``model``: the denoiser the parameters belong to, whose sharded state (run.sharding) every process writes
    its part of."""
    root = out / "checkpoints"
    staging, final = root / f".staging-{PREFIX}{epoch}", root / f"{PREFIX}{epoch}"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()

    rank = accelerator.process_index
    tensors, plain = rng or rng_state(prompt_rng)  # every process has its own streams
    save_file(tensors, str(staging / f"rng-{rank}.safetensors"))
    (staging / f"rng-{rank}.json").write_text(json.dumps(plain))
    if any_sharded(params):
        dcp.save(_sharded_state(model, params, optimizer, ema, old_policy), checkpoint_id=staging / SHARDED)
    elif accelerator.is_main_process:
        save_file(
            {k: v.detach().float().cpu().contiguous() for k, v in params.items()},
            str(staging / "trainable.safetensors"),
        )
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
        for name, average in (("ema", ema), ("old_policy", old_policy)):  # old_policy: DiffusionNFT's
            if average is not None:
                save_file({k: v.contiguous() for k, v in average.shadow.items()}, str(staging / f"{name}.safetensors"))
    if accelerator.is_main_process:
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), staging / "scaler.pt")
        (staging / "state.json").write_text(json.dumps({**state, "epoch": epoch}))  # written last: marks complete
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        _write_manifest(staging)  # every process's files are in place now
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        for old in newest_first(out)[keep:]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load(
    accelerator,
    path: Path,
    *,
    params: dict[str, torch.Tensor],
    optimizer,
    prompt_rng: np.random.Generator,
    ema=None,
    old_policy=None,
    model: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Restore everything ``save`` wrote; returns the plain state (epoch, global_step, tracker, ...). A sharded
    checkpoint loads into sharded or whole parameters alike, on any number of processes (``model``: the
    denoiser the parameters belong to)."""
    if (path / SHARDED).is_dir():
        _load_sharded(path, model, params, optimizer, ema, old_policy)
    else:
        _load_whole(path, params, optimizer, ema, old_policy)
    if accelerator.scaler is not None and (path / "scaler.pt").exists():
        accelerator.scaler.load_state_dict(_read(torch.load, path / "scaler.pt", weights_only=True))
    rank = accelerator.process_index
    if not (path / f"rng-{rank}.json").exists():
        raise ValueError(f"run.resume_from: {path} was written by fewer processes than this run has ({rank + 1}+)")
    set_rng_state(
        _read(load_file, path / f"rng-{rank}.safetensors"),
        json.loads((path / f"rng-{rank}.json").read_text()),
        prompt_rng,
    )
    return json.loads((path / "state.json").read_text())


def _load_whole(path: Path, params, optimizer, ema, old_policy) -> None:
    weights = _read(load_file, path / "trainable.safetensors")
    missing = set(params) - set(weights)
    if missing:
        raise ValueError(
            f"run.resume_from: {path} lacks {len(missing)} trainable tensors (e.g. {sorted(missing)[0]}); "
            "was it written with the same model and LoRA settings?"
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(weights[name])
    optimizer.load_state_dict(_read(torch.load, path / "optimizer.pt", map_location="cpu", weights_only=True))
    averages = (
        ("ema", ema, "EMA weights; it was written with train.ema_decay 0"),
        ("old_policy", old_policy, "old policy; it was not written by --algorithm nft, awm or dgpo"),
    )
    for name, average, missing in averages:
        if average is not None:
            file = path / f"{name}.safetensors"
            if not file.exists():
                raise ValueError(f"run.resume_from: {path} has no {missing}")
            average.shadow = {k: v.to(params[k].device) for k, v in _read(load_file, file).items()}


def _sharded_state(model, params, optimizer, ema, old_policy) -> dict[str, Any]:
    """What a sharded checkpoint holds, as torch.distributed.checkpoint saves and loads it in place: the
    trainable weights, the optimizer state by parameter name (get_optimizer_state_dict, so that it reshards),
    and the EMA and lagging weights (shards beside their parameters)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = {
        "trainable": {name: p.detach() for name, p in params.items()},
        "optimizer": get_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer)),
    }
    for name, average in (("ema", ema), ("old_policy", old_policy)):
        if average is not None:
            state[name] = average.shadow
    return state


def _load_sharded(path: Path, model, params, optimizer, ema, old_policy) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    state = _sharded_state(model, params, optimizer, ema, old_policy)
    try:
        dcp.load(state, checkpoint_id=path / SHARDED)  # into the tensors above, resharded as this run shards
    except Exception as exc:  # missing keys (other LoRA settings, no EMA written) and unreadable shards alike
        raise CheckpointError(f"run.resume_from: cannot load the sharded state in {path / SHARDED}: {exc}") from exc
    set_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), state["optimizer"])


def _read(reader, file: Path, **kwargs):
    """``reader(file)``, its failure naming the file (safetensors' and zip errors name none)."""
    try:
        return reader(str(file), **kwargs)
    except Exception as exc:
        raise CheckpointError(f"run.resume_from: cannot read {file}: {type(exc).__name__}: {exc}") from exc
