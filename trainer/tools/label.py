"""AI-feedback preference pairs from any scorer: ``python -m trainer.label``.

Two modes, both writing Pick-a-Pic v2's parquet layout (caption, jpg_0, jpg_1, label_0) with each image's
score kept as ``score_0`` / ``score_1`` (and all its prompt's as ``group_scores``), which ``--dpo.dataset``
then reads:

    # (a) relabel existing pairs with a choice model (here a reward server: LLaVA, PickScore, ...)
    python -m trainer.label --source /data/pickapic_v2 --url http://127.0.0.1:8000 --out /data/pickapic-llava
    # (b) sample images per prompt from a model and label them (here the embedded world's verifier)
    python -m trainer.label --model tiny-shapes --prompt_fn shapes --pairs 2000 --scorer shapes --out data/shapes-pairs

In (b), ``--images_per_prompt K`` above 2 samples K images of each prompt and keeps its best- and
worst-scored as the pair: fewer ties, and a wider gap between winner and loser, for K - 2 more samples.

The choice model is a scorer in process (``--scorer``, ``--options``) or one or more reward servers
(``--url``), exactly as the trainer's ``reward.*``; batches go out while the next are prepared, so a server
batches them across requests. A pair whose scores differ by no more than ``--margin`` is a tie and dropped.
Output goes in shards of ``--shard_size`` pairs, each written whole (to a temporary name, then renamed): an
interrupted run started again with the same arguments skips the shards already written. The settings that
shape the shards are recorded first (``label-settings.json``); started again under others, it refuses, naming
them (a shard of another size would be skipped as if it held this run's pairs), unless ``--relabel``
discards the shards and labels again.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import AfterValidator, Field, ValidationError, field_serializer
from pydantic_settings import BaseSettings, CliApp, SettingsConfigDict

from trainer.config.group import Bounded

from protocol.errors import redact_url
from trainer.config.run import checked_output_dir
from trainer.prompts import checked_file  # numpy only: light to import

SETTINGS_FILE = "label-settings.json"
# What the shards' contents depend on; the output folder, the server's address, batching and caches do not.
SHAPING = (
    "source",
    "model",
    "prompt_fn",
    "prompts",
    "pairs",
    "images_per_prompt",
    "steps",
    "guidance_scale",
    "seed",
    "resolution",
    "scorer",
    "options",
    "margin",
    "shard_size",
)


class LabelSettings(Bounded, BaseSettings):
    """Label preference pairs with a scorer (a reward server or in process), in Pick-a-Pic's layout."""

    model_config = SettingsConfigDict(cli_prog_name="python -m trainer.label", cli_implicit_flags=True)

    out: Annotated[Path, AfterValidator(checked_output_dir)] = Field(description="output folder of parquet shards")
    source: str | None = Field(None, description="(a) pairs to relabel: a folder or hub id, as --dpo.dataset")
    model: str | None = Field(None, description="(b) sample pairs from this model (as --pretrained.model)")
    prompt_fn: str = Field("shapes", description="(b) the trainer's prompt.fn names")
    prompts: Annotated[Path | None, AfterValidator(checked_file)] = Field(
        None, description="(b) one prompt per line, in place of --prompt_fn"
    )
    pairs: int = Field(256, gt=0, description="(b) pairs to sample: prompts, each drawn with images_per_prompt images")
    images_per_prompt: int = Field(
        2, ge=2, description="(b) images sampled per prompt; its best- and worst-scored make the pair"
    )
    steps: int = Field(20, gt=0, description="(b) sampler steps")
    guidance_scale: float = Field(5.0, ge=1.0)
    seed: int = 0
    batch_size: int = Field(32, gt=0, description="images per sampling batch and scoring request")
    resolution: int = Field(512, gt=0, description="(a) images are resized and centre-cropped to this for scoring")
    scorer: str = Field("shapes", description="the choice model: a scorer name (in process), or a label with --url")
    url: list[str] = Field([], description="reward server URL(s) of the choice model")
    options: dict[str, str | int | float] = Field({}, description="in-process scorer options")
    margin: float = Field(0.0, ge=0, description="scores closer than this are a tie, dropped")
    shard_size: int = Field(256, gt=0)
    cache_dir: Path | None = None
    check_rows: int = Field(
        10_000,
        ge=0,
        description="(a) source pairs whose images are opened and decoded before "
        "the scorer loads; later ones as they are read (as the trainer's dpo.check_rows)",
    )
    allow_outside_paths: bool = Field(False, description="(a) let the source's image paths point outside its folder")
    relabel: bool = Field(
        False,
        description="discard the shards already in --out (written under other settings) and label every pair again",
    )

    @field_serializer("url")
    def _masked(self, urls: list[str]) -> list[str]:
        return [redact_url(url) for url in urls]  # label.json is written: never a password


def label(s: LabelSettings) -> dict:
    """Write the shards; returns counts (pairs seen, kept, ties dropped)."""
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    from trainer.config import RewardConfig
    from trainer.rewards import Rewards

    if (s.source is None) == (s.model is None):
        raise ValueError("give exactly one of --source (relabel pairs) and --model (sample pairs)")
    if s.source and s.images_per_prompt != 2:
        raise ValueError("--images_per_prompt samples images with --model; --source pairs have two")
    if s.source:
        _check_source(s)
    _resumable(s)  # before the scorer loads
    rewards = Rewards(RewardConfig(scorer=s.scorer, url=s.url, options=s.options))
    counts = {"pairs": 0, "kept": 0, "ties": 0}
    try:
        total, shard = _relabelled(s) if s.source else _sampled(s)
        with tqdm(total=total, desc="label", unit="pair") as progress:
            for index in range((total + s.shard_size - 1) // s.shard_size):
                path = s.out / f"part-{index:05d}.parquet"
                size = min(total, (index + 1) * s.shard_size) - index * s.shard_size
                if path.is_file():  # written whole by an earlier run
                    kept = pq.ParquetFile(path).metadata.num_rows
                else:
                    rows = _scored(shard(index), rewards, s)
                    _write(rows, path)
                    kept = len(rows)
                counts["pairs"] += size
                counts["kept"] += kept
                counts["ties"] += size - kept
                progress.update(size)
    finally:
        rewards.close()
    (s.out / "label.json").write_text(json.dumps({**s.model_dump(mode="json"), **counts}, indent=2))
    return counts


def _check_source(s: LabelSettings) -> None:
    """The source's pairs checked as the trainer checks its data (trainer/datacheck.py), labels aside."""
    from trainer.datacheck import pairs_problems

    found = pairs_problems(
        s.source,
        labels=False,
        allow_outside=s.allow_outside_paths,
        limit=s.check_rows,
        cache_dir=s.cache_dir,
        flag="--allow_outside_paths",
        field="--source",
    )
    if found:
        raise ValueError("--source: " + "\n  ".join(found))


def _resumable(s: LabelSettings) -> None:
    """Record the settings that shape the shards, or refuse to add to shards written under others (naming
    them); ``--relabel`` first deletes the shards there."""
    shaping = {k: v for k, v in s.model_dump(mode="json").items() if k in SHAPING}
    record = s.out / SETTINGS_FILE
    shards = sorted(s.out.glob("part-*.parquet")) if s.out.is_dir() else []
    if s.relabel:
        for path in [*shards, *s.out.glob(".part-*.partial")]:
            path.unlink()
    elif shards:
        before = json.loads(record.read_text()) if record.is_file() else None
        if before is None:
            raise ValueError(
                f"{s.out} holds {len(shards)} shard(s) but no {SETTINGS_FILE}: the settings they were "
                "written under are unknown; give --relabel to label every pair again, or another --out"
            )
        changed = [
            f"{k}: {before.get(k)!r} when its shards were written, {v!r} now"
            for k, v in shaping.items()
            if before.get(k) != v
        ]
        if changed:
            raise ValueError(
                f"{s.out} holds {len(shards)} shard(s) written under other settings; resuming would "
                "mix them (or skip pairs):\n  " + "\n  ".join(changed) + "\ngive the same settings to "
                "resume, --relabel to discard the shards and label again, or another --out"
            )
    s.out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(shaping, indent=2))


def _scored(rows: list[dict], rewards, s: LabelSettings) -> list[dict]:
    """Each row's images (``images``: two, or images_per_prompt sampled) scored, every batch submitted before
    the first is awaited; the best and the worst kept as the pair (in their order), labelled; ties dropped."""
    from trainer.pairs import jpeg
    from trainer.rewards import Pending, best_and_worst, pair_scores

    k = len(rows[0]["images"])
    per_request = max(1, s.batch_size // k)
    requests = []
    for start in range(0, len(rows), per_request):
        part = rows[start : start + per_request]
        images = np.stack([im for r in part for im in r.pop("images")])
        metadata = [r.pop("metadata", {}) for r in part]
        pending = Pending(rewards)
        pending.add(
            rewards.submit(
                images, [r["caption"] for r in part for _ in range(k)], [m for m in metadata for _ in range(k)]
            )
        )
        requests.append((part, images.reshape(-1, k, *images.shape[1:]), pending))
    kept = []
    for part, images, pending in requests:
        scores = pair_scores(rewards, pending.wait(600.0), k)
        for row, group, group_images, (i, j) in zip(part, scores, images, best_and_worst(scores)):
            a, b = group[i], group[j]
            if abs(a - b) > s.margin:  # the source's own bytes when relabelling, else the sampled images
                kept.append(
                    {
                        **row,
                        "jpg_0": row.get("jpg_0") or jpeg(group_images[i]),
                        "jpg_1": row.get("jpg_1") or jpeg(group_images[j]),
                        "label_0": 1.0 if a > b else 0.0,
                        "score_0": float(a),
                        "score_1": float(b),
                        "group_scores": [float(x) for x in group],
                    }
                )
    return kept


def _relabelled(s: LabelSettings):
    """(number of pairs, shard index -> rows): the source's pairs, their images decoded for scoring."""
    import datasets

    from trainer.datacheck import pairs_source
    from trainer.rowcheck import RowError, image_data
    from trainer.pairs import preprocess_image

    check = pairs_source(
        s.source,
        labels=False,
        allow_outside=s.allow_outside_paths,
        cache_dir=s.cache_dir,
        flag="--allow_outside_paths",
        field="--source",
    ).check
    folder = Path(s.source)
    root = folder if folder.is_dir() else None
    if root is not None:
        files = sorted(str(p) for p in folder.rglob("*.parquet"))
        ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=s.cache_dir)
    else:
        ds = datasets.load_dataset(s.source, split="train", cache_dir=s.cache_dir)
    rng = np.random.default_rng(0)  # centre crops and no flips: never drawn from

    def shard(index: int) -> list[dict]:
        rows = []
        first = index * s.shard_size
        for number, row in enumerate(ds.select(range(first, min(len(ds), first + s.shard_size))), first):
            row = {k: v for k, v in row.items() if k not in ("label_0", "score_0", "score_1", "group_scores")}
            row["images"] = []
            for k in (0, 1):  # past --check_rows a bad row stops the labelling here, named as up front
                try:
                    row[f"jpg_{k}"] = image_data(row[f"jpg_{k}"], root, s.allow_outside_paths, check.flag)
                    pixels, _ = preprocess_image(
                        check.image(row, f"jpg_{k}"), s.resolution, rng, random_crop=False, hflip=False
                    )
                except RowError as exc:
                    raise ValueError(f"--source: {check.where(number)}: {exc}") from None
                row["images"].append((pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
            rows.append(row)
        return rows

    return len(ds), shard


def _sampled(s: LabelSettings):
    """(number of pairs, shard index -> rows): images_per_prompt images per prompt from the model
    (deterministic DDIM from seeds of their own), the model loaded when the first shard is needed."""
    import contextlib

    import torch

    from trainer.config import Config
    from trainer.evaluate import evaluate
    from trainer.families.models import load_family
    from trainer.prompts import lines, make_prompt_fn

    cfg = Config(pretrained={"model": s.model, "cache_dir": s.cache_dir}, prompt={"fn": s.prompt_fn})
    if s.prompts is not None:
        listed = lines(s.prompts, "--prompts")
        drawn = [(listed[i % len(listed)], {}) for i in range(s.pairs)]
    else:
        prompt_fn, rng = make_prompt_fn(cfg.prompt.fn), np.random.default_rng(s.seed)
        drawn = [prompt_fn(rng) for _ in range(s.pairs)]
    loaded = []

    class Unscored:  # evaluate() submits what it samples; here a shard's rows are scored together after
        sources: dict = {}

        def submit(self, *args):
            return {}

    def shard(index: int) -> list[dict]:
        if not loaded:
            loaded.append(load_family(cfg, torch.device("cuda" if torch.cuda.is_available() else "cpu")))
        family = loaded[0]
        if "sample.num_frames" in getattr(family, "settings", ()):  # a video family's (trainer/families/models.py)
            raise ValueError(
                f"--model {s.model}: a video model; preference pairs hold images (Diffusion-DPO trains on videos "
                "online, sampling and scoring its own pairs: --algorithm dpo --dpo.online)"
            )
        part, k = range(index * s.shard_size, min(s.pairs, (index + 1) * s.shard_size)), s.images_per_prompt
        prompts = [drawn[i][0] for i in part for _ in range(k)]
        seeds = [s.seed * 1_000_003 + k * i + j for i in part for j in range(k)]
        images, _ = evaluate(
            family,
            family.denoiser,
            prompts,
            [{}] * len(prompts),
            Unscored(),
            num_steps=s.steps,
            guidance_scale=s.guidance_scale,
            resolution=family.native_resolution(),
            seeds=seeds,
            batch_size=s.batch_size,
            autocast=contextlib.nullcontext,
        )
        return [
            {"caption": drawn[i][0], "metadata": drawn[i][1], "images": list(images[k * n : k * (n + 1)])}
            for n, i in enumerate(part)
        ]

    return s.pairs, shard


def _write(rows: list[dict], path: Path) -> None:
    from trainer.pairs import write_parquet

    staging = path.with_name(f".{path.name}.partial")
    write_parquet([{k: v for k, v in r.items() if k != "metadata"} for r in rows], staging)
    staging.rename(path)


def main(argv: list[str] | None = None) -> None:
    from protocol.errors import cli_message

    try:
        settings = CliApp.run(LabelSettings, cli_args=sys.argv[1:] if argv is None else argv)
        print(json.dumps(label(settings)))
        return
    except ValidationError as exc:
        message = cli_message(exc)
    except ValueError as exc:  # the user's settings or data, as the trainer says them: exit 2, no traceback
        message = str(exc)
    print(f"python -m trainer.label: {message}", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    main()
