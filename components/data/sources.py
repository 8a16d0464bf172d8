"""Text sources for shard building: text files, directories or globs of files, JSONL and parquet.

A source spec is a string:
- a file: `.jsonl` / `.jsonl.gz` (one document per line, `text_field`), `.parquet` (one document per row of
  the `text_field` column), anything else (the whole file is one document);
- a directory: every file under it, recursively, in sorted order (each by the rules above);
- a glob (`*`, `?` or `[` in it, `**` recursive): the matching files in sorted order.
Order is deterministic, so a rebuild from the same sources gives the same documents.

Messy input is skipped, not tokenized and not fatal, and every skip is counted with its reason in a
`SourceReport` (which the shard manifest keeps): binary files (NUL bytes, or many control bytes), text that none of
the `encodings` decodes (tried in order: UTF-8, then the declared fallback), malformed JSONL lines and records
without a text field (`on_bad_record="fail"` stops at the first instead, naming file and line), empty files.
"""
from __future__ import annotations

import codecs
import glob
import gzip
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_ENCODINGS = ("utf-8", "cp1252")
BAD_RECORD_POLICIES = ("skip", "fail")
SNIFF_BYTES = 8192  # binary detection looks at the start of a file
MAX_CONTROL_SHARE = 0.10  # more control bytes than this (besides tab, newline, CR, FF, VT, BS, ESC) is not text
_TEXT_CONTROLS = set(b"\t\n\r\f\v\b\x1b")
_CONTROL = bytes(b for b in range(32) if b not in _TEXT_CONTROLS) + b"\x7f"
MAX_EXAMPLES = 5


def count_with_example(counts: dict[str, int], examples: dict[str, list[str]], kind: str, where: str) -> None:
    """One more `kind` in `counts`; `where` joins its first MAX_EXAMPLES places in `examples` (what reports show)."""
    counts[kind] = counts.get(kind, 0) + 1
    shown = examples.setdefault(kind, [])
    if len(shown) < MAX_EXAMPLES:
        shown.append(where)


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


@dataclass
class SourceReport:
    """What reading the sources skipped or repaired: counts per kind and the first few reasons of each."""

    files: int = 0
    documents: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    SKIPPED = ("binary_files", "undecodable_files", "bad_records", "empty_files")

    def note(self, kind: str, reason: str) -> None:
        count_with_example(self.counts, self.examples, kind, reason)

    def to_dict(self) -> dict:
        """For the manifest: {files, documents, skipped: {kind: {count, first}}, decoded_with: {encoding: ...}}."""
        def entry(kind: str) -> dict:
            return {"count": self.counts[kind], "first": list(self.examples.get(kind, []))}

        return {"files": self.files, "documents": self.documents,
                "skipped": {k: entry(k) for k in self.SKIPPED if k in self.counts},
                "decoded_with": {k.split(":", 1)[1]: entry(k) for k in sorted(self.counts) if k.startswith("decoded:")}}

    def summary(self) -> list[str]:
        """Lines for the user: one per kind, then its first reasons."""
        lines = []
        for kind in (*self.SKIPPED, *sorted(k for k in self.counts if k.startswith("decoded:"))):
            if kind not in self.counts:
                continue
            label = f"decoded as {kind.split(':', 1)[1]}" if kind.startswith("decoded:") else \
                f"skipped {kind.replace('_', ' ')}"
            lines.append(f"{label}: {self.counts[kind]}")
            lines += [f"  {reason}" for reason in self.examples.get(kind, [])]
        return lines


class _Reader:
    """Reads one file's documents under the decoding and bad-record rules, noting every skip in `report`."""

    def __init__(self, text_field: str, encodings: tuple[str, ...], on_bad_record: str, report: SourceReport):
        for name in encodings:
            try:
                codecs.lookup(name)
            except LookupError:
                raise ValueError(f"encoding {name!r} is unknown (e.g. utf-8, cp1252, latin-1)") from None
        if not encodings:
            raise ValueError("encodings=() : give at least one, e.g. ('utf-8',)")
        if on_bad_record not in BAD_RECORD_POLICIES:
            raise ValueError(f"on_bad_record={on_bad_record!r} must be one of {BAD_RECORD_POLICIES}")
        self.text_field, self.encodings, self.on_bad_record, self.report = \
            text_field, tuple(encodings), on_bad_record, report
        self._fallback_used: str | None = None  # per file: the fallback encoding one of its parts needed
        self._skipped_whole_file = False  # per file: skipped as binary or undecodable (not also "empty")

    def _decode(self, data: bytes) -> str | None:
        for k, name in enumerate(self.encodings):
            try:
                text = data.decode(name)
            except UnicodeDecodeError:
                continue
            if k > 0:
                self._fallback_used = name
            return text
        return None

    def _bad(self, where: str, why: str) -> None:
        if self.on_bad_record == "fail":
            raise ValueError(f"{where}: {why} (use --on-bad-record skip to skip such records)")
        self.report.note("bad_records", f"{where}: {why}")

    def documents(self, path: Path) -> Iterator[str]:
        self._fallback_used, self._skipped_whole_file = None, False
        name = path.name
        count = 0
        if name.endswith((".jsonl", ".jsonl.gz")):
            docs = self._jsonl(path)
        elif name.endswith(".parquet"):
            docs = self._parquet(path)
        else:
            docs = self._text(path)
        for doc in docs:
            count += 1
            yield doc
        if self._fallback_used:
            self.report.note(f"decoded:{self._fallback_used}", str(path))
        if count == 0 and not self._skipped_whole_file:
            self.report.note("empty_files", f"{path}: no text")

    def _text(self, path: Path) -> Iterator[str]:
        data = path.read_bytes()
        head = data[:SNIFF_BYTES]
        utf16 = any(codecs.lookup(e).name.startswith("utf-16") or codecs.lookup(e).name.startswith("utf-32")
                    for e in self.encodings)
        if b"\0" in head and not utf16:
            self._skip_file("binary_files", f"{path}: binary (NUL bytes)")
            return
        controls = len(head) - len(head.translate(None, _CONTROL))
        if head and controls / len(head) > MAX_CONTROL_SHARE:
            self._skip_file("binary_files", f"{path}: binary ({controls / len(head):.0%} control bytes)")
            return
        text = self._decode(data)
        if text is None:
            self._skip_file("undecodable_files", f"{path}: not text in {', '.join(self.encodings)}")
            return
        if text.strip():
            yield text

    def _skip_file(self, kind: str, reason: str) -> None:
        self._skipped_whole_file = True
        self.report.note(kind, reason)

    def _jsonl(self, path: Path) -> Iterator[str]:
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                where = f"{path}:{lineno}"
                line = self._decode(raw.rstrip(b"\r\n"))
                if line is None:
                    self._bad(where, f"not text in {', '.join(self.encodings)}")
                    continue
                try:
                    record = json.loads(line)
                except ValueError as err:
                    self._bad(where, f"not JSON ({err})")
                    continue
                if not isinstance(record, dict):
                    self._bad(where, f"a JSON {type(record).__name__}, not an object")
                    continue
                if self.text_field not in record:
                    self._bad(where, f"no field {self.text_field!r} (fields: {sorted(record)[:10]})")
                    continue
                value = record[self.text_field]
                if not isinstance(value, str):
                    self._bad(where, f"field {self.text_field!r} is {json.dumps(value)[:40]}, not a string")
                    continue
                if value:
                    yield value

    def _parquet(self, path: Path) -> Iterator[str]:
        import pyarrow.parquet as pq

        table = pq.ParquetFile(path)
        if self.text_field not in table.schema_arrow.names:
            raise ValueError(f"{path}: no column {self.text_field!r} (columns: {table.schema_arrow.names[:10]})")
        row = 0
        for batch in table.iter_batches(columns=[self.text_field], batch_size=4096):
            for value in batch.column(0).to_pylist():
                row += 1
                if value is None:
                    self._bad(f"{path}: row {row}", f"{self.text_field!r} is null")
                elif value:
                    yield str(value)


def iter_documents(specs: list[str], text_field: str = "text", *, encodings: tuple[str, ...] = DEFAULT_ENCODINGS,
                   on_bad_record: str = "skip", report: SourceReport | None = None) -> Iterator[str]:
    """All documents of all sources, in order; what was skipped and why goes to `report` (see module docstring).
    Empty documents are skipped."""
    report = report if report is not None else SourceReport()
    reader = _Reader(text_field, tuple(encodings), on_bad_record, report)
    files = [f for spec in specs for f in source_files(spec)]  # validate every spec before reading any
    for f in files:
        report.files += 1
        for doc in reader.documents(f):
            report.documents += 1
            yield doc

