"""One row of a user's image dataset checked, the same up front (trainer/datacheck.py, before any model loads)
and mid-run (``Pairs`` checks each row past ``dpo.check_rows`` as it reads it): its fields have their types
(images as bytes, a {bytes, path} struct or a path; captions; preference labels 0, 0.5 or 1), and each image
exists, lies inside the dataset folder unless allowed, and decodes. ``RowCheck`` names a row by its file and
row; ``RowError`` is one problem, as "column: what is wrong".
"""

from __future__ import annotations

import errno
import io
from dataclasses import dataclass
from dataclasses import field as _field
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, create_model


class RowError(ValueError):
    """One row's problem, as "column: what is wrong"."""


def _label(value: Any) -> Any:
    if type(value) not in (int, float) or value not in (0, 0.5, 1):  # bool is an int; "yes" and None are not labels
        raise ValueError(f"{value!r} is not 0, 0.5 or 1 (1: the first image preferred, 0: the second, 0.5: a tie)")
    return float(value)


def _image_ref(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, str)) or (
        isinstance(value, dict) and (value.get("bytes") or value.get("path"))
    ):
        return value
    kind = type(value).__name__
    raise ValueError(
        f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} ({value!r:.40}), expected image bytes, a path or a "
        "{bytes, path} struct"
    )


Label = Annotated[Any, BeforeValidator(_label)]
ImageRef = Annotated[Any, BeforeValidator(_image_ref)]


def row_model(images: tuple[str, ...], text: str, labelled: bool) -> type[BaseModel]:
    """The pydantic model of one row: its image columns, its caption column and, for pairs, ``label_0``."""
    fields: dict[str, Any] = {name: (ImageRef, ...) for name in images}
    fields[text] = (str | None, None) if labelled else (str, ...)  # Pick-a-Pic's captions may be missing
    if labelled:
        fields["label_0"] = (Label, ...)
    return create_model("Row", __config__=ConfigDict(extra="allow"), **fields)


def image_data(value: Any, root: Path | None, allow_outside: bool, flag: str) -> bytes:
    """The bytes of an image reference; RowError saying what is wrong. A path outside ``root`` (symlinks
    resolved; with no folder, as for a hub dataset, every path) is not even opened unless ``allow_outside``."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    path = Path(value)
    full = path if path.is_absolute() or root is None else root / path
    loop = RowError(f"{value} is a symlink loop")
    try:
        if not allow_outside and (root is None or not full.resolve().is_relative_to(root.resolve())):
            raise RowError(f"{value} lies outside the dataset folder (allow it with {flag})")
        return full.read_bytes()
    except RuntimeError:  # Path.resolve's "Symlink loop from ..." (Python < 3.13)
        raise loop from None
    except FileNotFoundError:
        raise RowError(f"no such file {value}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise loop from None
        raise RowError(f"{value} cannot be read ({exc.strerror or exc})") from None


def decoded(data: bytes, value: Any):
    """The PIL image of ``data`` (read from ``value``), fully decoded: a truncated file fails here."""
    from PIL import Image, UnidentifiedImageError

    what = f"{value} does not" if isinstance(value, str) else "the image bytes do not"
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image
    except UnidentifiedImageError:  # its message names a BytesIO object
        raise RowError(f"{what} decode (cannot identify image file)") from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError... on bad data
        raise RowError(f"{what} decode ({exc})") from None


def _path_of(value: Any) -> Any:
    return value.get("path") if isinstance(value, dict) and not value.get("bytes") else value


@dataclass
class RowCheck:
    """Checks one row (``problems``) and names it by file and row (``where``); the same up front and mid-run."""

    images: tuple[str, ...]  # the image columns, as the rows have them
    text: str
    labelled: bool
    root: Path | None
    allow_outside: bool = False
    flag: str = "--dpo.allow_outside_paths"
    field: str = "dpo.dataset"  # the setting that names the dataset, at the start of every message
    names: dict[str, str] = _field(default_factory=dict)  # column -> the user's name for it, in messages
    files: list[tuple[str, int]] = _field(default_factory=list)  # (file, rows) in load order; -1 rows: a jsonl

    def __post_init__(self):
        self.model = row_model(self.images, self.text, self.labelled)

    def problems(self, row: dict, images: bool = True) -> list[str]:
        """Every problem of the row, as "column: what is wrong"; its images opened and decoded (``images``)
        once its fields have their types."""
        try:
            self.model.model_validate(row)
        except ValidationError as exc:
            return [
                f"{self._name(e['loc'][0])}: {e['msg'].removeprefix('Value error, ')}"
                for e in exc.errors(include_url=False)
            ]
        found = []
        for column in self.images if images else ():
            try:
                self.image(row, column)
            except RowError as exc:
                found.append(str(exc))
        return found

    def validated(self, row: dict) -> None:
        """RowError with the row's first problem of type (its images are checked as they are read)."""
        found = self.problems(row, images=False)
        if found:
            raise RowError(found[0])

    def image(self, row: dict, column: str):
        """The decoded image of the row's ``column``; RowError naming the column and the problem."""
        value = row[column]
        try:
            return decoded(image_data(value, self.root, self.allow_outside, self.flag), _path_of(value))
        except RowError as exc:
            raise RowError(f"{self._name(column)}: {exc}") from None

    def where(self, source_row: int) -> str:
        if self.files and self.files[0][1] < 0:
            return f"{self.files[0][0]} line {source_row}"
        for name, rows in self.files:
            if source_row < rows:
                return f"{name} row {source_row}"
            source_row -= rows
        return f"row {source_row}"

    def _name(self, column: Any) -> str:
        return self.names.get(str(column), str(column))
