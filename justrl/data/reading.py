"""Read table rows from a HF dataset id, a local .parquet/.jsonl/.json file, or a directory.

One code path: a hub id is first downloaded (parquet/jsonl files only) with huggingface_hub, then
read like a local directory. Rows come with their file and index so that a bad row can be named.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

DATA_SUFFIXES = (".parquet", ".jsonl", ".json")
PARQUET_BATCH_ROWS = 65536


@dataclass(frozen=True)
class Row:
    file: str
    index: int
    """0-based row index within `file`."""
    data: Any
    """The row as a dict, or whatever a jsonl line held."""


def resolve_files(source: str) -> list[Path]:
    """The data files behind `source`: a file, a directory (searched recursively), or a hub id."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix not in DATA_SUFFIXES:
            raise ValueError(f"{path}: unsupported data file type; use one of {DATA_SUFFIXES}")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in DATA_SUFFIXES and p.is_file())
        if not files:
            raise FileNotFoundError(f"{path}: directory holds no {'/'.join(DATA_SUFFIXES)} files")
        return files
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise FileNotFoundError(f"{source}: no such file or directory (and not a HF dataset id 'owner/name')")
    return resolve_files(_download_hub_dataset(source))


def _download_hub_dataset(repo_id: str) -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, repo_type="dataset",
                                 allow_patterns=[f"*{s}" for s in DATA_SUFFIXES])
    except Exception as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise FileNotFoundError(
            f"{repo_id}: not a local path, and the HF dataset could not be fetched"
            f"{' (HF_HUB_OFFLINE=1 and it is not in the cache)' if offline else ''}: "
            f"{type(exc).__name__}: {exc}") from exc


def iter_rows(source: str, columns: list[str] | None = None) -> Iterator[Row]:
    """Every row of every file behind `source`, in file order then row order.

    `columns` (parquet only) limits what is read; absent columns are simply not read.
    """
    for file in resolve_files(source):
        if file.suffix == ".parquet":
            yield from _parquet_rows(file, columns)
        else:
            yield from _json_rows(file)


def _parquet_rows(file: Path, columns: list[str] | None) -> Iterator[Row]:
    import pyarrow.parquet as pq

    handle = pq.ParquetFile(file)
    wanted = None
    if columns is not None:
        wanted = [c for c in columns if c in handle.schema_arrow.names]
    index = 0
    for batch in handle.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=wanted):
        for data in batch.to_pylist():
            yield Row(str(file), index, data)
            index += 1


def _json_rows(file: Path) -> Iterator[Row]:
    with open(file, encoding="utf-8") as handle:
        if file.suffix == ".json":
            # A .json file is either one array of rows or, as often, jsonl with another name.
            text = handle.read()
            try:
                data = json.loads(text)
            except json.JSONDecodeError:
                data = None
            if isinstance(data, list):
                for index, row in enumerate(data):
                    yield Row(str(file), index, row)
                return
            lines = text.splitlines()
        else:
            lines = handle
        index = 0
        for line in lines:
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                data = BadJsonLine(str(exc))
            yield Row(str(file), index, data)
            index += 1


@dataclass(frozen=True)
class BadJsonLine:
    """A jsonl line that is not JSON; the caller skips and counts it like any malformed row."""

    error: str
