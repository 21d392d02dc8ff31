"""What a run shows: per-sample records, the captioned sample grid, scorer info as text, histograms."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

LOGS = ("metrics.jsonl", "samples.jsonl", "eval.jsonl")  # one JSON record per line, each with its "epoch"


def tensorboard(accelerator):
    """The SummaryWriter when this process logs to tensorboard, else None (other processes get a stand-in)."""
    try:
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
    except (ValueError, KeyError):
        return None
    return writer if hasattr(writer, "add_histogram") else None


def show_samples(accelerator, out, epoch, images, batches, scored, rewards, hook, sheet: bool) -> None:
    """The hook (every process, its own batches) and, on the main process, a captioned grid of the first
    batch with the scorers' per-image info as text."""
    start = 0
    per_batch = []
    for array, batch in zip(images, batches):
        n = len(batch.prompts)
        per_batch.append(
            {
                "images": array,
                "prompts": batch.prompts,
                "metadata": batch.metadata,
                "rewards": {name: out_.scores[start : start + n] for name, out_ in scored.items()},
                "info": {
                    name: {k: v[start : start + n] for k, v in out_.info.items()} for name, out_ in scored.items()
                },
            }
        )
        start += n
    if hook is not None:
        hook(epoch, per_batch)
    if not (sheet and accelerator.is_main_process):
        return
    from trainer.grid import save_sheet

    first, total = per_batch[0], rewards[: len(per_batch[0]["prompts"])]  # the main process's first batch
    captions = [f"{r:+.3f} {p}" for p, r in zip(first["prompts"], total)]
    (out / "images").mkdir(exist_ok=True)  # videos: frame strips, and the animation beside them
    picture = save_sheet(
        list(first["images"]), captions, min(8, len(captions)), out / "images" / f"epoch-{epoch:04d}.png"
    )
    board = tensorboard(accelerator)
    if board is not None:
        board.add_image("samples", np.asarray(picture), epoch, dataformats="HWC")
        # Every sample of this process, not only the pictured batch (the main process's come first in
        # ``rewards``, which is gathered process-major).
        rows, i = ["| prompt | reward | info |", "| --- | --- | --- |"], 0
        for batch in per_batch:
            for j, prompt in enumerate(batch["prompts"]):
                info = "; ".join(f"{n}.{k}={v[j]}" for n, fields in batch["info"].items() for k, v in fields.items())
                rows.append(f"| {_cell(prompt)} | {rewards[i]:+.4f} | {_cell(info)} |")
                i += 1
        board.add_text("samples", "\n".join(rows), epoch)


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def sample_records(epoch: int, process: int, prompts: list[str], scored: dict) -> list[dict]:
    """One JSON-able record per local sample: prompt, each component's score and info (prefixed when several)."""
    several = len(scored) > 1
    records = []
    for i, prompt in enumerate(prompts):
        record = {"epoch": epoch, "process": process, "prompt": prompt}
        for name, out in scored.items():
            if several:
                record[name] = float(out.scores[i])
            record.update({f"{name}/{k}" if several else k: v[i] for k, v in out.info.items()})
        records.append(record)
    return records


def _category_key(records: list[dict]) -> str | None:
    return next((k for k in (records[0] if records else {}) if k == "category" or k.endswith("/category")), None)


def categories(records: list[dict]) -> np.ndarray | None:
    """Each image's GenEval-style category, when a scorer tells it."""
    key = _category_key(records)
    return None if key is None else np.array([str(r[key]) for r in records])


def by_category(records: list[dict], rewards: np.ndarray) -> dict[str, float]:
    """A GenEval-style breakdown, when a scorer says each image's ``category`` (and whether it is fully
    ``correct``, as the shapes verifier does): ``accuracy`` and, per category, the mean reward and accuracy."""
    labels = categories(records)
    if labels is None:
        return {}
    correct_key = _category_key(records)[: -len("category")] + "correct"
    correct = np.array([bool(r[correct_key]) for r in records]) if correct_key in records[0] else None
    out = {} if correct is None else {"accuracy": float(correct.mean())}
    for c in sorted(set(labels)):
        out[f"category/{c}/reward_mean"] = float(np.asarray(rewards)[labels == c].mean())
        if correct is not None:
            out[f"category/{c}/accuracy"] = float(correct[labels == c].mean())
    if correct is not None:  # GenEval's overall score (Ghosh et al. 2023): the mean of its tags' accuracies
        out["accuracy_category_mean"] = float(np.mean([correct[labels == c].mean() for c in set(labels)]))
    return out


def flat(tree: dict, prefix: str = "") -> dict:
    """Nested config as flat scalars (what tensorboard's hparams accept)."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def trim_logs(out: Path, epoch: int) -> None:
    """Drop the records of epochs ``epoch`` and later: a run killed after logging an epoch but before its
    checkpoint logs that epoch again when it resumes. A line that does not parse (a kill mid-write) goes too."""
    for name in LOGS:
        path = Path(out) / name
        if not path.exists():
            continue
        kept = path.with_name(f".{name}.trimmed")
        with open(path) as src, open(kept, "w") as dst:
            for line in src:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record.get("epoch", record.get("step", -1)) < epoch:  # DPO's count steps; others are not ours
                    dst.write(line if line.endswith("\n") else line + "\n")
        os.replace(kept, path)  # atomic: a kill now leaves the old or the trimmed log, never half of one


def start_trackers(accelerator, cfg, start: int) -> None:
    """tensorboard writes straight into the run folder (no nested project folder, no timestamped hparams
    run beside it): the config goes into the same events file as hparams. wandb gets the project
    "diffusion-rl" and the config."""
    config = flat(cfg.model_dump(mode="json"))
    kwargs = tracker_kwargs(cfg.run.log_with, start)
    if cfg.run.log_with != "tensorboard":
        accelerator.init_trackers("diffusion-rl", config=config, init_kwargs=kwargs)
        return
    accelerator.init_trackers("", init_kwargs=kwargs)  # the run name "" puts the events in project_dir itself
    board = tensorboard(accelerator)
    if board is not None:
        from torch.utils.tensorboard.summary import hparams

        writer = board._get_file_writer()
        for summary in hparams(config, {}):
            writer.add_summary(summary)


def tracker_kwargs(log_with: str, start: int) -> dict:
    """accelerate's ``init_kwargs``: on resume, tensorboard hides the events of the epochs about to be redone
    (SummaryWriter's purge_step: readers drop earlier-written events at or after that step)."""
    if log_with == "tensorboard" and start > 0:
        return {"tensorboard": {"purge_step": start}}
    return {}
