"""Training data from local files: CSV, JSONL, Parquet, or a ``datasets`` folder (``save_to_disk``).

Every row keeps where it came from (``train.jsonl, line 7``), so a bad value is reported with
its file, line and column.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Any

from adapterkit.errors import AdapterError

FORMATS = ".csv, .jsonl, .json, .parquet or a datasets folder (save_to_disk)"


class DataError(AdapterError):
    """A data file that cannot be used as asked: names the file, the line and the column."""


@dataclasses.dataclass
class Table:
    """Rows of one file; ``places[i]`` says where row ``i`` is (``"line 7"``, ``"row 3"``)."""

    path: str
    rows: list[dict[str, Any]]
    places: list[str]

    def column(self, name: str, option: str) -> list[Any]:
        """The values of column ``name``; ``option`` is the CLI flag that names it (for the error)."""
        if not any(name in row for row in self.rows):
            have = sorted({key for row in self.rows for key in row})
            raise DataError(f"{self.path}: no column {name!r} (columns: {', '.join(have)}); pass {option} NAME")
        values = []
        for row, place in zip(self.rows, self.places, strict=True):
            if row.get(name) is None or row.get(name) == "":
                raise DataError(f"{self.path}, {place}: column {name!r} is missing or empty")
            values.append(row[name])
        return values

    def fail(self, index: int, column: str, problem: str) -> DataError:
        return DataError(f"{self.path}, {self.places[index]}, column {column!r}: {problem}")


def read_table(path: str | Path) -> Table:
    """Read ``path`` by its suffix (or as a ``datasets`` folder); an empty table is an error."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        table = _read_saved_dataset(path)
    else:
        readers = {".csv": _read_csv, ".jsonl": _read_jsonl, ".json": _read_jsonl, ".parquet": _read_parquet}
        if path.suffix not in readers:
            raise DataError(f"{path}: unknown data format {path.suffix!r}; use {FORMATS}")
        table = readers[path.suffix](path)
    if not table.rows:
        raise DataError(f"{path} is empty: no rows")
    return table


def _read_csv(path: Path) -> Table:
    rows, places = [], []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        for row in reader:
            if None in row:  # more cells than header fields
                raise DataError(f"{path}, line {reader.line_num}: {len(row[None])} more cells than the header has")
            rows.append(row)
            places.append(f"line {reader.line_num}")
    return Table(str(path), rows, places)


def _read_jsonl(path: Path) -> Table:
    rows, places = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}, line {number}: not valid JSON ({e})") from e
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
            places.append(f"line {number}")
    return Table(str(path), rows, places)


def _read_parquet(path: Path) -> Table:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises its own error types for a damaged file
        raise DataError(f"{path}: not a readable Parquet file ({e})") from e
    return Table(str(path), rows, [f"row {i}" for i in range(len(rows))])


def _read_saved_dataset(path: Path) -> Table:
    from datasets import DatasetDict, load_from_disk

    try:
        data = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"{path}: not a folder written by datasets' save_to_disk ({e})") from e
    if isinstance(data, DatasetDict):
        if len(data) != 1:
            raise DataError(f"{path} holds the splits {sorted(data)}; pass one of them: {path}/SPLIT")
        data = next(iter(data.values()))
    rows = data.to_list()
    return Table(str(path), rows, [f"row {i}" for i in range(len(rows))])
