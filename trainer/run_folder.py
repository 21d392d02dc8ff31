"""A run's folder holds one run: another run pointed at it is refused, the same run goes on in it.

Every run writes its settings to ``<run.output_dir>/config.json`` when it starts. A run that finds one there
compares it with its own settings before anything else (before any model loads, before it writes a file) and
is refused, naming both, if they differ in anything but ``RUN_CONTROL``: the settings that say how long, how
often, where to or on what machine a run goes, not what it trains. Those may change from one start of a run
to the next (``--run.num_epochs`` to train longer, ``--run.resume_from auto`` after a preemption, another
reward URL or process count on another machine). A setting the file does not list (written by an older
version) is not compared. So ``--run.resume_from auto`` never continues, nor a fresh start overwrites,
another preset's or other settings' run; two runs of one preset share its default folder only when their
settings are the same.
"""

from __future__ import annotations

import json
import os
import sys
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from trainer import checkpoint

# Settings that may differ between the starts of one run (patterns of dotted paths; * is any list index).
RUN_CONTROL = (
    "config",  # the --config file the settings came from (a resume gives the run's own config.json)
    "run.output_dir",  # the folder itself, however it is spelled, or after it was moved
    "run.resume_from",
    # how long, how often it checkpoints and logs: a run may be extended and checkpoint more often
    "run.num_epochs",
    "*.max_train_steps",
    "run.save_freq",
    "run.checkpoint_limit",
    "*.checkpointing_steps",
    "*.log_every",
    "run.log_with",
    "run.log_images_every",
    "run.eval_drift",
    "run.push_to_hub",
    "run.stop_grace_s",
    # evaluation: what is measured, with its own seeds and streams, not what is trained
    "run.eval_every",
    "run.eval_seed",
    "run.eval_scorer",
    "sample.eval_num_steps",
    "prompt.eval_path",
    "prompt.eval_count",
    # the machine: the same updates, computed with other memory, speed or process layouts
    "run.cpu_threads",
    "run.allow_tf32",
    "run.compile",
    "run.channels_last",
    "run.sharding",
    "run.reshard_after_forward",
    "run.shard_text_encoders",
    "run.offload_text_encoders",
    "run.cpu_offload",
    "train.gradient_checkpointing",
    "train.timesteps_per_forward",
    "pretrained.cache_dir",
    "dpo.cache_dir",
    "dpo.dataloader_num_workers",
    # where the reward servers are and how long to wait for them: the scorer itself (reward.scorer) is compared
    "reward.url",
    "reward.components.*.url",
    "reward.timeout",
    "reward.deadline",
    "reward.retries",
    "reward.probe_timeout",
)


class RunFolderError(ValueError):
    """run.output_dir holds another run's files."""


def check_same_run(cfg) -> None:
    """Refuse ``cfg`` if run.output_dir holds another run (module docstring); reads config.json only."""
    out = Path(cfg.run.output_dir)
    stored_file = out / "config.json"
    if not stored_file.is_file():
        return
    try:
        stored = json.loads(stored_file.read_text())
        if not isinstance(stored, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        raise RunFolderError(
            f"run.output_dir {out} holds a config.json that cannot be read ({exc}): it is not this run's to "
            f"continue; give another --run.output_dir, or delete {out} to start over"
        ) from None
    differences = _differences(stored, json.loads(cfg.model_dump_json()))
    if not differences:
        return
    shown = [f"{name}: {there} there, {here} here" for name, there, here in differences[:8]]
    if len(differences) > 8:
        shown.append(f"and {len(differences) - 8} more")
    raise RunFolderError(
        f"run.output_dir {out} holds another run ({stored_file}: preset {stored.get('preset')!r}; this run: "
        f"preset {cfg.preset!r}), whose settings differ:\n  "
        + "\n  ".join(shown)
        + f"\nA run continues in its folder only with the same settings (but for how long it runs, its checkpoints, "
        f"logging, evaluation, machine and reward server addresses). Give this run another --run.output_dir, "
        f"resume that one with --config {stored_file}, or delete {out} to start over."
    )


def _differences(stored: dict, given: dict) -> list[tuple[str, str, str]]:
    there, here = _leaves(stored), _leaves(given)
    return [
        (name, _shown(there[name]), _shown(here[name]))
        for name in sorted(there.keys() & here.keys())
        if there[name] != here[name] and not any(fnmatchcase(name, pattern) for pattern in RUN_CONTROL)
    ]


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted path -> value; a list of settings groups (reward.components) by index, and its length."""
    if isinstance(tree, dict):
        found = {}
        for key, value in tree.items():
            found.update(_leaves(value, f"{prefix}{key}."))
        return found
    name = prefix.rstrip(".")
    if isinstance(tree, list) and any(isinstance(item, dict) for item in tree):
        found = {f"{name} (how many)": len(tree)}
        for i, item in enumerate(tree):
            found.update(_leaves(item, f"{prefix}{i}."))
        return found
    return {name: tree}


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def write_config(cfg, out: Path) -> None:
    """config.json, replaced whole (a kill mid-write leaves the old file or the new one, never half)."""
    staged = out / ".config.json.tmp"
    staged.write_text(cfg.model_dump_json(indent=2))  # the token is excluded from dumps
    os.replace(staged, out / "config.json")


def resume_point(accelerator, cfg) -> tuple[Path | None, int]:
    """The verified checkpoint to resume from (None: a fresh run) and the epoch it ends."""
    from accelerate.utils import gather_object

    if cfg.run.resume_from is None or (
        cfg.run.resume_from == "auto" and not checkpoint.newest_first(cfg.run.output_dir)
    ):
        return None, 0
    where = cfg.run.output_dir if cfg.run.resume_from == "auto" else cfg.run.resume_from

    def warn(message: str) -> None:
        if accelerator.is_main_process:
            print(message, file=sys.stderr, flush=True)

    found = checkpoint.resolve(where, warn=warn)
    chosen = set(gather_object([found.name]))
    if len(chosen) > 1:  # e.g. a machine whose copy of the run folder differs; the processes would diverge
        raise checkpoint.CheckpointError(
            f"run.resume_from: the processes found different checkpoints: {sorted(chosen)}"
        )
    return found, json.loads((found / "state.json").read_text())["epoch"]
