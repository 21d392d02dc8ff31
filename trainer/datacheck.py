"""A user's image dataset checked as a whole before any model loads, each problem named with its file and row.

Checked: every parquet file opens; every line of ``pairs.jsonl`` / ``metadata.jsonl`` is a JSON object whose
fields have their types (all lines: that is cheap); each row's images (bytes, a {bytes, path} struct, or a
path that must lie inside the dataset folder unless allowed) exist and decode; preference labels are 0, 0.5
or 1; at least one pair is not a tie. Decoding every image of a huge dataset would take hours, so the rows
are checked in full up to ``limit`` (``dpo.check_rows``); ``Pairs`` checks each later row as it reads it
(``RowCheck``), with the same message, and the run stops before it trains on that batch.

Here the sources (a parquet folder, a pairs.jsonl or metadata.jsonl folder, a hub dataset) read for checking
and the checks of a whole source; one row's checks are trainer/rowcheck.py's ``RowCheck``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from trainer.prompts import split_lines
from trainer.rowcheck import RowCheck, RowError

PAIR_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
JSONL_IMAGES = {"image_0": "jpg_0", "image_1": "jpg_1"}  # pairs.jsonl's names for Pick-a-Pic's columns
SHOWN = 50  # problems listed per source: a dataset broken throughout need not print every row
SOURCE_ROW = "source_row"  # the row's place in its source (a JSON line's number), kept to name it mid-run


def jsonl_rows(path: Path) -> Iterator[tuple[int, dict | None, str | None]]:
    """(line number, the object or None, its problem or None) per non-blank line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        yield 0, None, f"cannot be read ({exc})"
        return
    for number, line in enumerate(split_lines(text), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            yield number, None, f"not a JSON object ({exc})"
            continue
        yield (
            (number, obj, None)
            if isinstance(obj, dict)
            else (number, None, f"not a JSON object (a {type(obj).__name__})")
        )


def parquet_rows(files: list[Path], columns: tuple[str, ...]) -> Iterator[tuple[Path, int, dict | None, str | None]]:
    """(file, row, the row or None, its problem or None); a file that does not open is one problem, row -1."""
    import pyarrow.parquet as pq

    for path in files:
        try:
            reader = pq.ParquetFile(path)
            missing = [c for c in columns if c not in reader.schema_arrow.names]
            if missing:
                yield (
                    path,
                    -1,
                    None,
                    (f"has no column(s) {', '.join(missing)} (it has {', '.join(reader.schema_arrow.names)})"),
                )
                continue
            row = 0
            for batch in reader.iter_batches(batch_size=64, columns=list(columns)):
                for values in batch.to_pylist():
                    yield path, row, values, None
                    row += 1
        except Exception as exc:  # pyarrow's errors on a damaged file are ArrowInvalid, OSError, ...
            yield path, -1, None, f"not a readable parquet file ({exc})"


@dataclass
class Source:
    """A dataset's rows, read for checking: ``rows()`` yields (where, row in the check's column names or
    None, problem or None); ``cheap``: every row may be type-checked (a JSON file) past ``limit``."""

    name: str  # for problems of the whole: the jsonl file, the folder, the hub id
    check: RowCheck
    rows: Any
    cheap: bool = False


def _renamed(row: dict, names: dict[str, str]) -> dict:
    back = {user: ours for ours, user in names.items()}
    return {back.get(k, k): v for k, v in row.items()}


def _parquet_sizes(files: list[Path]) -> list[tuple[str, int]]:
    import pyarrow.parquet as pq

    sizes = []
    for path in files:
        try:
            sizes.append((str(path), pq.read_metadata(path).num_rows))
        except Exception:  # unreadable: reported by the check, and it holds no rows the run reads
            sizes.append((str(path), 0))
    return sizes


def _jsonl(path: Path, check: RowCheck) -> Source:
    def rows():
        return (
            (f"{path} line {n}", row and _renamed(row, check.names), problem)  # noqa: E731
            for n, row, problem in jsonl_rows(path)
        )

    check.files = [(str(path), -1)]
    return Source(str(path), check, rows, cheap=True)


def _parquet(folder: Path, files: list[Path], check: RowCheck) -> Source:
    columns = tuple(
        check.names.get(c, c) for c in (*check.images, check.text, *(("label_0",) if check.labelled else ()))
    )

    def rows():
        return (
            (f"{p} row {r}" if r >= 0 else str(p), row and _renamed(row, check.names), problem)  # noqa: E731
            for p, r, row, problem in parquet_rows(files, columns)
        )

    check.files = _parquet_sizes(files)
    return Source(str(folder), check, rows)


def pairs_source(
    source: str,
    *,
    split: str = "train",
    cache_dir: Path | None = None,
    allow_outside: bool = False,
    flag: str = "--dpo.allow_outside_paths",
    field: str = "dpo.dataset",
    labels: bool = True,
) -> Source:
    """The rows of a preference dataset (parquet folder, pairs.jsonl folder or hub id); RowError if it has none.
    ``labels``: False for pairs about to be relabelled (trainer.label), whose label_0 is not read."""
    folder = Path(source)
    if folder.is_dir():
        parquet = sorted(folder.rglob("*.parquet"), key=str)  # the order load_pairs reads them in
        if parquet:
            return _parquet(
                folder, parquet, RowCheck(("jpg_0", "jpg_1"), "caption", labels, folder, allow_outside, flag, field)
            )
        if (folder / "pairs.jsonl").is_file():
            names = {ours: user for user, ours in JSONL_IMAGES.items()}
            return _jsonl(
                folder / "pairs.jsonl",
                RowCheck(("jpg_0", "jpg_1"), "caption", labels, folder, allow_outside, flag, field, names),
            )
        raise RowError(f"{folder} holds neither *.parquet files nor pairs.jsonl")
    if source.startswith((".", "/", "~")) or source.count("/") > 1:  # a path, not a hub id
        raise RowError(f"{source}: no such folder")
    check = RowCheck(("jpg_0", "jpg_1"), "caption", labels, None, allow_outside, flag, field, files=[(source, 1 << 62)])

    def rows():
        import datasets

        try:
            ds = datasets.load_dataset(source, split=split, cache_dir=cache_dir)
        except Exception as exc:  # the hub, the network, the cache: the datasets library's many errors
            yield source, None, f"cannot be loaded ({type(exc).__name__}: {exc})"
            return
        missing = [c for c in PAIR_COLUMNS[: 4 if labels else 3] if c not in ds.column_names]
        if missing:
            yield source, None, f"has no column(s) {', '.join(missing)} (it has {', '.join(ds.column_names)})"
            return
        yield from ((f"{source} row {i}", row, None) for i, row in enumerate(ds))

    return Source(source, check, rows)


def images_source(
    source: str,
    *,
    cache_dir: Path | None = None,
    allow_outside: bool = False,
    flag: str = "--refl.pretrain_allow_outside_paths",
    field: str = "refl.pretrain_data",
) -> Source:
    """The rows of an image-and-caption dataset (``trainer.pairs.load_images``' layouts); RowError if none."""
    folder = Path(source)
    meta = folder / "metadata.jsonl"
    if meta.is_file():
        first = next((row for _, row, _ in jsonl_rows(meta) if row is not None), {})
        return _jsonl(
            meta,
            RowCheck(
                ("jpg_0",), "caption", False, folder, allow_outside, flag, field, image_columns(source, list(first))
            ),
        )
    parquet = sorted(folder.rglob("*.parquet"), key=str) if folder.is_dir() else []
    if not parquet:  # a pairs.jsonl folder or a hub id: its winners
        return pairs_source(source, cache_dir=cache_dir, allow_outside=allow_outside, flag=flag, field=field)
    import pyarrow.parquet as pq

    try:
        columns = pq.read_schema(parquet[0]).names
    except Exception as exc:  # pyarrow's errors on a damaged file
        raise RowError(f"{parquet[0]}: not a readable parquet file ({exc})") from None
    if set(PAIR_COLUMNS) <= set(columns):
        return pairs_source(source, cache_dir=cache_dir, allow_outside=allow_outside, flag=flag, field=field)
    return _parquet(
        folder,
        parquet,
        RowCheck(("jpg_0",), "caption", False, folder, allow_outside, flag, field, image_columns(source, columns)),
    )


def image_columns(source: str, columns: list[str]) -> dict[str, str]:
    """{"jpg_0": the image column, "caption": the caption column} of an image dataset's columns."""
    image = next((c for c in ("image", "file_name", "jpg_0") if c in columns), None)
    text = next((c for c in ("caption", "text") if c in columns), None)
    if image is None or text is None:
        raise RowError(
            f"{source} needs an image column (image or file_name) and a caption column (caption or "
            f"text); it has {', '.join(columns) or 'none'}"
        )
    return {"jpg_0": image, "caption": text}


def problems(source: Source, limit: int) -> list[str]:
    """Every problem of the source's first ``limit`` rows (a JSON file's other lines: their types), each
    "file row N: column: problem"; then whether it has rows, and a pair that is not a tie."""
    found, rows, preferred, complete = [], 0, 0, True
    for where, row, problem in source.rows():
        if problem is not None:
            found.append(f"{where}: {problem}")
            continue
        rows += 1
        if rows > limit and not source.cheap:
            complete = False
            break
        row_problems = source.check.problems(row, images=rows <= limit)
        found += [f"{where}: {p}" for p in row_problems]
        preferred += not row_problems and source.check.labelled and row["label_0"] != 0.5
    if not found and rows == 0:
        found.append(f"{source.name} has no {'pairs' if len(source.check.images) == 2 else 'images'}")
    elif not found and complete and source.check.labelled and not preferred:
        found.append(f"{source.name} has no pair with a preference (every label_0 is 0.5)")
    if len(found) > SHOWN:
        found[SHOWN:] = [f"... and {len(found) - SHOWN} more problems in {source.name}"]
    return found


def pairs_problems(source: str, *, allow_outside: bool = False, limit: int = 10_000, **options) -> list[str]:
    """``problems`` of a preference dataset; [its one problem] when there is no dataset to read."""
    try:
        return problems(pairs_source(source, allow_outside=allow_outside, **options), limit)
    except RowError as exc:
        return [str(exc)]


def images_problems(source: str, *, allow_outside: bool = False, limit: int = 10_000, **options) -> list[str]:
    try:
        return problems(images_source(source, allow_outside=allow_outside, **options), limit)
    except RowError as exc:
        return [str(exc)]
