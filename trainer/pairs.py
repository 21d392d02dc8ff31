"""Preference pairs for Diffusion-DPO, read with the ``datasets`` library and preprocessed as its seed does.

Sources (``dpo.dataset``):

- a folder of parquet files in Pick-a-Pic v2's layout: ``caption``, ``jpg_0``, ``jpg_1`` (JPEG bytes) and
  ``label_0`` (1: the first image preferred, 0: the second, 0.5: a tie); other columns are kept;
- a folder holding ``pairs.jsonl``, one ``{"caption", "image_0", "image_1", "label_0"}`` per line, the
  images as paths relative to the folder (users' own data);
- a dataset id on the hub (e.g. ``yuvalkirstain/pickapic_v2``, since removed there), cached in ``dpo.cache_dir``.

The run's pre-flight check reads every row first (trainer/datacheck.py: files inside the folder, decoding,
labels 0, 0.5 or 1), up to ``dpo.check_rows``; ``Pairs`` checks each later row as it reads it, and a bad one
stops the run (``next_batch``) before it is trained on. Ties are dropped and each pair is returned winner first.
Preprocessing is Diffusion-DPO's (Wallace et al. 2023, github.com/SalesforceAIResearch/DiffusionDPO): the
shorter side resized to the resolution (bilinear), a centre crop (a random one with ``dpo.random_crop``), a
random horizontal flip unless ``--no-dpo.hflip``, and a share ``dpo.proportion_empty_prompts`` of captions
replaced by "" (so the model keeps its unconditional prediction for guidance). Each pair also carries SDXL's
micro-conditioning (original size, crop corner, target size). Decoding runs in DataLoader workers; the
randomness of pair i in data epoch e comes from the seed (run.seed, e, i) alone, so an interrupted run resumes
on exactly the same batches.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from trainer.datacheck import JSONL_IMAGES, PAIR_COLUMNS, SOURCE_ROW, image_columns, jsonl_rows
from trainer.rowcheck import RowCheck, RowError


class PairsError(ValueError):
    """A preference dataset that cannot be used, with what to fix."""


def load_pairs(source: str, split: str = "train", cache_dir: Path | None = None, field: str = "dpo.dataset"):
    """The dataset of ``source`` (see the module docstring) with its ties dropped, each row's place in its
    source kept (``source_row``: trainer/datacheck.py names a bad row by it); errors name ``field``.
    Preflight (``datacheck``) checks the rows; here only what loading needs."""
    folder = Path(source)
    if folder.is_dir():
        parquet = sorted(str(p) for p in folder.rglob("*.parquet"))
        if parquet:
            ds = _loaded(field, source, "parquet", data_files=parquet, split="train", cache_dir=cache_dir)
        elif (folder / "pairs.jsonl").is_file():
            check = RowCheck(("image_0", "image_1"), "caption", True, folder, field=field)
            ds = _jsonl_dataset(folder / "pairs.jsonl", check, "pairs").rename_columns(JSONL_IMAGES)
        else:
            raise PairsError(f"{field}: {folder} holds neither *.parquet files nor pairs.jsonl")
    elif source.startswith((".", "/", "~")) or source.count("/") > 1:  # a path, not a hub id
        raise PairsError(f"{field}: {source}: no such folder")
    else:
        ds = _loaded(field, source, source, split=split, cache_dir=cache_dir)
    missing = [c for c in PAIR_COLUMNS if c not in ds.column_names]
    if missing:
        raise PairsError(
            f"{field}: {source} has no column(s) {', '.join(missing)} (it has "
            f"{', '.join(ds.column_names)}); expected Pick-a-Pic's caption, jpg_0, jpg_1, label_0"
        )
    if SOURCE_ROW not in ds.column_names:
        ds = ds.add_column(SOURCE_ROW, range(len(ds)))
    ds = ds.filter(lambda label: label != 0.5, input_columns="label_0")  # ties: no preference to learn
    if len(ds) == 0:
        raise PairsError(f"{field}: {source} has no pair with a preference (every label_0 is 0.5)")
    return ds


def _loaded(field: str, source: str, *args, **kwargs):
    import datasets

    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as exc:  # a damaged file, files whose columns differ, the hub: the library's many errors
        raise PairsError(f"{field}: {source} cannot be loaded ({type(exc).__name__}: {exc})") from None


def _jsonl_dataset(path: Path, check: RowCheck, what: str):
    """A JSON-lines file as a dataset of the check's columns, each row with its line number (``source_row``);
    PairsError listing every line that is not a row of them (all are checked: that is cheap)."""
    import datasets

    columns = [*check.images, check.text, *(["label_0"] if check.labelled else [])]
    rows, problems = [], []
    for number, row, problem in jsonl_rows(path):
        found = [problem] if problem else check.problems(row, images=False)
        problems += [f"{path} line {number}: {p}" for p in found]
        if not found:
            rows.append({**{c: row.get(c) for c in columns}, SOURCE_ROW: number})
    if problems or not rows:
        raise PairsError(f"{check.field}: " + ("\n  ".join(problems) if problems else f"{path} has no {what}"))
    return datasets.Dataset.from_list(rows)


def load_images(source: str, cache_dir: Path | None = None, field: str = "refl.pretrain_data"):
    """Real images with captions (ReFL's pre-training step) as a dataset of one image per row, in the pairs'
    column names (``jpg_0``, ``caption``, ``label_0`` = 1, and ``source_row``): a folder with
    ``metadata.jsonl`` (``file_name`` and ``text``, the layout of diffusers' text-to-image examples), a folder
    of parquet files with an image column (``image``) and ``caption`` or ``text``, or any preference
    dataset, whose winners are taken."""
    import datasets

    folder = Path(source)
    if (folder / "metadata.jsonl").is_file():
        first = next((row for _, row, _ in jsonl_rows(folder / "metadata.jsonl") if row is not None), {})
        try:
            columns = image_columns(source, list(first))
        except RowError as exc:
            raise PairsError(f"{field}: {exc}") from None
        check = RowCheck((columns["jpg_0"],), columns["caption"], False, folder, field=field)
        ds = _jsonl_dataset(folder / "metadata.jsonl", check, "images")
    else:
        parquet = sorted(str(p) for p in folder.rglob("*.parquet")) if folder.is_dir() else []
        if not parquet:  # a pairs.jsonl folder or a hub id
            return load_pairs(source, cache_dir=cache_dir, field=field)
        ds = _loaded(field, source, "parquet", data_files=parquet, split="train", cache_dir=cache_dir)
        if set(PAIR_COLUMNS) <= set(ds.column_names):
            return load_pairs(source, cache_dir=cache_dir, field=field)
        ds = ds.add_column(SOURCE_ROW, range(len(ds)))
    image = next((c for c in ("image", "file_name", "jpg_0") if c in ds.column_names), None)
    text = next((c for c in ("caption", "text") if c in ds.column_names), None)
    if image is None or text is None:
        raise PairsError(
            f"{field}: {source} needs an image column (image or file_name) and a caption column "
            f"(caption or text); it has {', '.join(c for c in ds.column_names if c != SOURCE_ROW)}"
        )
    if isinstance(ds.features[image], datasets.Image):  # bytes, not decoded: the workers decode
        ds = ds.cast_column(image, datasets.Image(decode=False))
    ds = ds.select_columns([image, text, SOURCE_ROW]).rename_columns({image: "jpg_0", text: "caption"})
    return ds.add_column("label_0", [1.0] * len(ds))


def preprocess(data: bytes, resolution: int, rng: np.random.Generator, random_crop: bool, hflip: bool):
    """Image bytes -> (3, R, R) float in [0, 1], and the micro-conditioning (orig h, orig w, crop top, crop left)."""
    from PIL import Image

    return preprocess_image(Image.open(io.BytesIO(data)), resolution, rng, random_crop, hflip)


def preprocess_image(image, resolution: int, rng: np.random.Generator, random_crop: bool, hflip: bool):
    """``preprocess`` of a PIL image."""
    from PIL import Image

    image = image.convert("RGB")
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(size, Image.BILINEAR)
    if random_crop:
        top, left = int(rng.integers(size[1] - resolution + 1)), int(rng.integers(size[0] - resolution + 1))
    else:
        top, left = (size[1] - resolution) // 2, (size[0] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    if hflip and rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
    return pixels, (height, width, top, left)


class Pairs(torch.utils.data.Dataset):
    """Item ``(epoch, i)``: pair i preprocessed with the randomness of that data epoch; ``winners_only``:
    its winner alone (pixels (1, 3, R, R)). A row that fails ``check`` (trainer/rowcheck.py: past the rows
    checked up front) is the item ``{"problem": message}``, which ``next_batch`` raises before training."""

    def __init__(
        self,
        ds,
        resolution: int,
        *,
        seed: int,
        random_crop: bool = False,
        hflip: bool = True,
        proportion_empty_prompts: float = 0.0,
        root: Path | None = None,
        winners_only: bool = False,
        check: RowCheck | None = None,
    ):
        self.ds, self.resolution, self.seed, self.root, self.winners_only = ds, resolution, seed, root, winners_only
        self.random_crop, self.hflip, self.empty = random_crop, hflip, proportion_empty_prompts
        self.check = check or RowCheck(("jpg_0", "jpg_1"), "caption", True, root)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, i = key
        row = self.ds[int(i)]
        try:
            return self._item(row, epoch, int(i))
        except RowError as exc:  # raised in the loop, not here: a DataLoader worker would wrap it in its traceback
            where = self.check.where(row[SOURCE_ROW]) if SOURCE_ROW in row else f"row {i}"
            return {"problem": f"{self.check.field}: {where}: {exc}"}

    def _item(self, row: dict[str, Any], epoch: int, i: int) -> dict[str, Any]:
        self.check.validated(row)
        rng = np.random.default_rng([self.seed, epoch, i])
        order = ("jpg_0", "jpg_1") if row["label_0"] == 1 else ("jpg_1", "jpg_0")  # winner first
        images, conditioning = [], None
        for column in order[:1] if self.winners_only else order:
            pixels, where = preprocess_image(
                self.check.image(row, column), self.resolution, rng, self.random_crop, self.hflip
            )
            images.append(pixels)
            conditioning = conditioning or where  # SDXL's micro-conditioning is the winner's
        caption = "" if rng.random() < self.empty else (row["caption"] or "")
        return {
            "pixels": torch.stack(images),
            "caption": caption,
            "prompt": row["caption"] or "",
            "index": int(i),
            "time_ids": torch.tensor([*conditioning, self.resolution, self.resolution], dtype=torch.float32),
        }


class PairBatches:
    """Batch sampler: every data epoch a fresh permutation (seeded by run.seed and the epoch), cut into global
    batches of ``batch_size x num_processes`` (a last partial batch is dropped); this process takes its own
    slice. Starts after ``skip`` batches, which is how a resumed run continues where it stopped."""

    def __init__(self, n: int, batch_size: int, num_processes: int, rank: int, seed: int, skip: int = 0):
        self.n, self.batch, self.processes, self.rank, self.seed, self.skip = (
            n,
            batch_size,
            num_processes,
            rank,
            seed,
            skip,
        )
        self.per_epoch = n // (batch_size * num_processes)
        if self.per_epoch == 0:
            raise PairsError(
                f"the dataset's {n} items do not fill one batch of train.batch_size {batch_size} x "
                f"{num_processes} process(es)"
            )

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, b = divmod(self.skip, self.per_epoch)
        while True:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            for start in range(
                b * self.batch * self.processes,
                self.per_epoch * self.batch * self.processes,
                self.batch * self.processes,
            ):
                mine = order[start + self.rank * self.batch : start + (self.rank + 1) * self.batch]
                yield [(epoch, int(i)) for i in mine]
            epoch, b = epoch + 1, 0


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    problems = [it["problem"] for it in items if "problem" in it]
    if problems:
        return {"problems": problems}
    return {
        "pixels": torch.stack([it["pixels"] for it in items]),
        "captions": [it["caption"] for it in items],
        "prompts": [it["prompt"] for it in items],
        "time_ids": torch.stack([it["time_ids"] for it in items]),
        "indices": [it["index"] for it in items],
    }


def next_batch(data: Iterator[dict[str, Any]]) -> dict[str, Any]:
    """The next batch; PairsError with the first bad row's message (its file and row) instead of a batch
    holding it: nothing is trained on a row that fails the check."""
    batch = next(data)
    if "problems" in batch:
        raise PairsError(batch["problems"][0])
    return batch


def loader(pairs: Pairs, batches: PairBatches, num_workers: int) -> torch.utils.data.DataLoader:
    # A generator of its own: the iterator's worker seed would otherwise be drawn from torch's global stream,
    # which a resumed run restores before the iterator exists (one draw later than the run it resumes).
    return torch.utils.data.DataLoader(
        pairs,
        batch_sampler=batches,
        collate_fn=collate,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(pairs.seed),
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if num_workers else None,
        persistent_workers=False,
    )


def write_parquet(rows: list[dict[str, Any]], path: Path) -> None:
    """Pairs in Pick-a-Pic's layout (``caption``, ``jpg_0``, ``jpg_1`` as bytes, ``label_0``, extra columns
    kept), as one parquet file."""
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows).to_parquet(str(path))


def jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    """uint8 HWC -> JPEG bytes (Pick-a-Pic stores its images so)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
