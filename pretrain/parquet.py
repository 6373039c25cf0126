"""Parquet files (a `datasets` folder's `*.parquet`, image + caption columns) as a streamed training set.

`--train-data path/to/parquet-folder` reads them through `pyarrow` (a `datasets` dependency)
in the order `pretrain.stream` defines for shards: each row group is one unit of that order
(its row count comes from the file's metadata, nothing is read up front), and a reader holds
the decoded columns of the few row groups it is drawing from. So ranks, workers, epochs of
`--train-num-samples` and the exact mid-epoch resume are the same as for tar shards.

The image column holds what `datasets` writes for an `Image` feature (a struct of `bytes` and
`path`), raw bytes, or a file name relative to the Parquet file's folder.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from vqa.errors import DataError


def _parquet_file(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None


def parquet_units(paths: Sequence[Path], image_column: str, caption_column: str
                  ) -> tuple[list[tuple[Path, int]], list[int]]:
    """((file, row group) per unit, rows per unit), from the metadata; a missing column is a DataError."""
    units, counts = [], []
    for path in paths:
        f = _parquet_file(path)
        names = f.schema_arrow.names
        for column in (image_column, caption_column):
            if column not in names:
                raise DataError(f"{path}: no column {column!r}; columns: {names} "
                                "(choose others with --image-column/--caption-column)")
        for g in range(f.metadata.num_row_groups):
            units.append((path, g))
            counts.append(f.metadata.row_group(g).num_rows)
    return units, counts


def parquet_captions(paths: Sequence[Path], caption_column: str, limit: int) -> list[str]:
    """Up to `limit` non-empty captions, file by file (a built text tower's vocabulary)."""
    out: list[str] = []
    for path in paths:
        f = _parquet_file(path)
        for g in range(f.metadata.num_row_groups):
            column = f.read_row_group(g, columns=[caption_column]).column(0).to_pylist()
            out += [str(c).strip() for c in column if c and str(c).strip()]
            if len(out) >= limit:
                return out[:limit]
    return out


def _decode(value: Any, folder: Path) -> Image.Image:
    if isinstance(value, dict):
        data, name = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray)):
        data, name = value, None
    else:
        data, name = None, value
    if data:
        source = io.BytesIO(data)
    elif name:
        source = Path(name) if Path(name).is_absolute() else folder / name
    else:
        raise ValueError("an empty image field")
    with Image.open(source) as img:
        img.load()  # decode now: a corrupt image fails here
        return img.copy()


class ParquetReader:
    """(image, caption, key) by (unit, row in its row group), keeping the columns of the last `keep` row groups."""

    def __init__(self, units: Sequence[tuple[Path, int]], image_column: str, caption_column: str, keep: int) -> None:
        self.units, self.columns, self.keep = units, (image_column, caption_column), keep
        self.open: dict[int, tuple[list, list, int]] = {}
        self.first_row: dict[Path, list[int]] = {}

    def _group(self, j: int) -> tuple[list, list, int]:
        if j not in self.open:
            if len(self.open) >= self.keep:
                self.open.pop(next(iter(self.open)))
            path, g = self.units[j]
            f = _parquet_file(path)
            if path not in self.first_row:
                starts, total = [], 0
                for i in range(f.metadata.num_row_groups):
                    starts.append(total)
                    total += f.metadata.row_group(i).num_rows
                self.first_row[path] = starts
            table = f.read_row_group(g, columns=list(self.columns))
            self.open[j] = (table.column(0).to_pylist(), table.column(1).to_pylist(), self.first_row[path][g])
        return self.open[j]

    def read(self, j: int, n: int) -> tuple[Image.Image, str, str] | str:
        """The sample, or why it is bad (naming the row and column)."""
        images, captions, first = self._group(j)
        row = first + n
        caption = str(captions[n] or "").strip()
        if not caption:
            return f"row {row}: empty {self.columns[1]!r}"
        try:
            image = _decode(images[n], self.units[j][0].parent)
        except (OSError, SyntaxError, ValueError) as e:
            return f"row {row}: {self.columns[0]!r} is not a readable image ({e})"
        return image, caption, f"row{row}"

    def close(self) -> None:
        self.open.clear()
