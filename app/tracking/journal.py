"""An append-only JSONL journal of tracking records with a durable "delivered up to here" position.

Every record the logger accepts is appended here before it is sent, so a tracking server that is down for
hours costs disk, not memory, and a process that dies keeps its undelivered records: the next process with
the same run key (the resume path) delivers them first. Re-delivering the last batch after a crash is
harmless: MLflow's SQL store ignores an exact duplicate of (key, value, timestamp, step), tags are
overwritten with the same value, and a param re-logged with the same value is accepted.
"""

from __future__ import annotations

import json
import os
from typing import Any

# Rewrite the file once this much has been delivered and nothing is pending.
_COMPACT_BYTES = 8 * 1024 * 1024


def _reopen_truncated(writer, path: str, size: int):
    try:
        writer.close()
    except OSError:
        pass  # its unwritten buffer is discarded with it
    os.truncate(path, size)
    return open(path, "ab")  # noqa: SIM115


class Journal:
    """FIFO of JSON records in ``path``; the read/delivered position is kept in ``path + '.pos'``."""

    def __init__(self, path: str):
        self.path = path
        self._pos_path = path + ".pos"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._writer = open(path, "ab")  # noqa: SIM115 - lives as long as the journal
        if self._writer.tell() > 0:  # a previous process may have died mid-line: end its torn record
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    self._writer.write(b"\n")
                    self._writer.flush()
        self._reader = open(path, "rb")  # noqa: SIM115
        self._delivered = self._read_pos()
        self._end = os.path.getsize(path)
        if self._delivered > self._end:
            self._delivered = 0
        self._peeked: list[int] = []  # byte length of each record handed out by the last peek()
        self.pending_at_open = self._count_lines(self._delivered, self._end)

    def _read_pos(self) -> int:
        try:
            with open(self._pos_path) as f:
                return int(f.read().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def _write_pos(self) -> None:
        tmp = self._pos_path + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(self._delivered))
        os.replace(tmp, self._pos_path)

    def _count_lines(self, start: int, end: int) -> int:
        self._reader.seek(start)
        return self._reader.read(end - start).count(b"\n")

    def append(self, records: list[Any]) -> None:
        """Append records in order (one JSON document per line) and make them visible to ``peek``."""
        if not records:
            return
        data = b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in records)
        try:
            self._writer.write(data)
            self._writer.flush()
        except OSError:  # e.g. disk full: cut a partial write back so the file stays whole lines
            self._writer = _reopen_truncated(self._writer, self.path, self._end)
            raise
        self._end += len(data)

    @property
    def has_pending(self) -> bool:
        return self._delivered < self._end

    def peek(self, max_records: int) -> list[Any]:
        """Up to ``max_records`` oldest undelivered records; ``commit(n)`` marks the first n delivered.

        A torn last line (the process died mid-write) is skipped: it is counted as a record and returned
        as ``None`` so the caller can commit past it.
        """
        self._reader.seek(self._delivered)
        records: list[Any] = []
        self._peeked = []
        while len(records) < max_records and self._reader.tell() < self._end:
            line = self._reader.readline()
            if not line.endswith(b"\n"):  # cannot happen: appends write whole lines
                break
            self._peeked.append(len(line))
            try:
                records.append(json.loads(line))
            except ValueError:
                records.append(None)
        return records

    def commit(self, n: int) -> None:
        """Mark the first ``n`` records of the last ``peek`` as delivered (durably)."""
        if n <= 0:
            return
        self._delivered += sum(self._peeked[:n])
        self._peeked = self._peeked[n:]
        if not self.has_pending and self._delivered >= _COMPACT_BYTES:
            self._writer.truncate(0)
            self._writer.seek(0)
            self._delivered = self._end = 0
        self._write_pos()

    def discard(self) -> None:
        """Close and delete the journal, delivered or not (its records were moved elsewhere)."""
        self._writer.close()
        self._reader.close()
        for p in (self.path, self._pos_path):
            try:
                os.remove(p)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        """Close the files; an empty, fully delivered journal is removed."""
        self._writer.close()
        self._reader.close()
        if not self.has_pending:
            for p in (self.path, self._pos_path):
                try:
                    os.remove(p)
                except FileNotFoundError:
                    pass
