"""Text sources for shard building: text files, directories or globs of files, JSONL and parquet.

A source spec is a string:
- a file: `.jsonl` / `.jsonl.gz` (one document per line, `text_field`), `.parquet` (one document per row of
  the `text_field` column), anything else (the whole file is one document, read as UTF-8);
- a directory: every file under it, recursively, in sorted order (each by the rules above);
- a glob (`*`, `?` or `[` in it, `**` recursive): the matching files in sorted order.
Order is deterministic, so a rebuild from the same sources gives the same documents.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
from collections.abc import Iterator
from pathlib import Path


def source_files(spec: str) -> list[Path]:
    """The files a source spec names, sorted. ValueError when it names nothing."""
    if any(ch in spec for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
    elif os.path.isdir(spec):
        files = sorted(p for p in Path(spec).rglob("*") if p.is_file())
    elif os.path.isfile(spec):
        files = [Path(spec)]
    else:
        raise ValueError(f"source {spec!r} does not exist (expected a file, a directory or a glob)")
    if not files:
        raise ValueError(f"source {spec!r} matches no files")
    return files


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if text_field not in record:
                raise ValueError(f"{path}:{lineno}: no field {text_field!r} (fields: {sorted(record)[:10]})")
            yield str(record[text_field])


def _iter_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path)
    if text_field not in table.schema_arrow.names:
        raise ValueError(f"{path}: no column {text_field!r} (columns: {table.schema_arrow.names[:10]})")
    for batch in table.iter_batches(columns=[text_field], batch_size=4096):
        for value in batch.column(0).to_pylist():
            if value is not None:
                yield str(value)


def iter_file_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    name = path.name
    if name.endswith(".jsonl") or name.endswith(".jsonl.gz"):
        yield from _iter_jsonl(path, text_field)
    elif name.endswith(".parquet"):
        yield from _iter_parquet(path, text_field)
    else:
        yield path.read_bytes().decode("utf-8", errors="replace")


def iter_documents(specs: list[str], text_field: str = "text") -> Iterator[str]:
    """All documents of all sources, in order. Empty documents are skipped."""
    files = [f for spec in specs for f in source_files(spec)]  # validate every spec before reading any
    for f in files:
        for doc in iter_file_documents(f, text_field):
            if doc:
                yield doc
