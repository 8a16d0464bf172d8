"""An append-only JSONL journal of tracking records with a durable "delivered up to here" position.

Every record the logger accepts is appended here before it is sent, so a tracking server that is down for
hours costs disk, not memory, and a process that dies keeps its undelivered records: the next process with
the same run key (the resume path) delivers them first. Re-delivering the last batch after a crash is
harmless: MLflow's SQL store ignores an exact duplicate of (key, value, timestamp, step), tags are
overwritten with the same value, and a param re-logged with the same value is accepted.

A full disk does not lose records: when an append fails, the records (and every later one, to keep the order) are
held in memory and still delivered; the journal writes to disk again once those are delivered. ``sync`` makes
what was appended durable (called before a checkpoint is published).
"""

from __future__ import annotations

import json
import os
from typing import Any

# Rewrite the file once this much has been delivered and nothing is pending.
_COMPACT_BYTES = 8 * 1024 * 1024


def _reopen_truncated(writer, path: str, size: int):
    try:
        if writer is not None:
            writer.close()
    except OSError:
        pass  # its unwritten buffer is discarded with it
    os.truncate(path, size)
    return open(path, "ab")  # noqa: SIM115


def _end_of_last_line(path: str) -> int:
    """Offset just after the file's last newline (0 if it has none)."""
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        while end > 0:
            start = max(end - 65536, 0)
            f.seek(start)
            chunk = f.read(end - start)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                return start + cut + 1
            end = start
    return 0


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
                    try:
                        self._writer.write(b"\n")
                        self._writer.flush()
                    except OSError:  # full disk: cut the torn record off instead
                        self._writer = _reopen_truncated(self._writer, path, _end_of_last_line(path))
        self._reader = open(path, "rb")  # noqa: SIM115
        self._delivered = self._read_pos()
        self._end = os.path.getsize(path)
        if self._delivered > self._end:
            self._delivered = 0
        self._peeked: list[int] = []  # byte length of each record handed out by the last peek() (0: in memory)
        self._memory: list[Any] = []  # records that could not be written (full disk), after the file's
        self.write_error: str | None = None  # why the last append went to memory, None while the disk takes them
        self.pending_at_open = self._count_lines(self._delivered, self._end)

    def _read_pos(self) -> int:
        try:
            with open(self._pos_path) as f:
                return int(f.read().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def _write_pos(self) -> None:
        tmp = self._pos_path + ".tmp"
        try:
            with open(tmp, "w") as f:
                f.write(str(self._delivered))
            os.replace(tmp, self._pos_path)
        except OSError:  # full disk: an older position only means re-sending records, which is harmless
            try:
                os.remove(tmp)
            except OSError:
                pass

    def _count_lines(self, start: int, end: int) -> int:
        self._reader.seek(start)
        return self._reader.read(end - start).count(b"\n")

    def append(self, records: list[Any]) -> None:
        """Append records in order (one JSON document per line) and make them visible to ``peek``; when the disk
        refuses them (full), hold them in memory (``write_error`` says why)."""
        if not records:
            return
        if self._memory:  # earlier records are waiting in memory: later ones queue behind them
            self._memory.extend(records)
            return
        data = b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in records)
        try:
            if self._writer is None:
                self._writer = open(self.path, "ab")  # noqa: SIM115
            self._writer.write(data)
            self._writer.flush()
        except OSError as error:  # e.g. disk full: cut a partial write back so the file stays whole lines
            try:
                self._writer = _reopen_truncated(self._writer, self.path, self._end)
            except OSError:
                self._writer = None
            self._memory.extend(records)
            self.write_error = f"{type(error).__name__}: {error}"
            return
        self._end += len(data)
        self.write_error = None

    def _close_writer(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except OSError:
                pass  # an unflushed tail is lost with it (records still in memory are not)
            self._writer = None

    def sync(self) -> None:
        """Flush appended records to the device (fsync), so they survive a crash of the machine too."""
        if self._writer is not None and self._end > 0:
            os.fsync(self._writer.fileno())

    @property
    def in_memory(self) -> int:
        """Records held in memory because the disk refused them."""
        return len(self._memory)

    @property
    def has_pending(self) -> bool:
        return self._delivered < self._end or bool(self._memory)

    def drop_pending(self, predicate) -> int:
        """Remove undelivered records for which ``predicate(record)`` is true (rewriting the file); how many.

        Used on resume: a dead process' metrics of steps after the checkpoint are produced again by the next one."""
        self._reader.seek(self._delivered)
        lines = self._reader.read(self._end - self._delivered).splitlines(keepends=True)
        keep = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a torn line: nothing to deliver
            if not predicate(record):
                keep.append(line)
        dropped = len(lines) - len(keep)
        if dropped == 0:
            return 0
        self._close_writer()
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as f:
            f.writelines(keep)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._reader.close()
        self._writer = open(self.path, "ab")  # noqa: SIM115
        self._reader = open(self.path, "rb")  # noqa: SIM115
        self._delivered, self._end = 0, os.path.getsize(self.path)
        self._write_pos()
        self.pending_at_open = max(self.pending_at_open - dropped, 0)
        return dropped

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
        if self._reader.tell() >= self._end:  # the file is delivered up to here: then the records in memory
            for record in self._memory[: max_records - len(records)]:
                self._peeked.append(0)
                records.append(record)
        return records

    def pending(self) -> list[Any]:
        """Every undelivered record, without moving the read position (torn or unparsable lines left out)."""
        with open(self.path, "rb") as f:
            f.seek(self._delivered)
            data = f.read(self._end - self._delivered)
        out = []
        for line in data.splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def commit(self, n: int) -> None:
        """Mark the first ``n`` records of the last ``peek`` as delivered (durably)."""
        if n <= 0:
            return
        self._delivered += sum(self._peeked[:n])
        del self._memory[: sum(1 for length in self._peeked[:n] if length == 0)]
        self._peeked = self._peeked[n:]
        if not self.has_pending and self._delivered >= _COMPACT_BYTES and self._writer is not None:
            self._writer.truncate(0)
            self._writer.seek(0)
            self._delivered = self._end = 0
        self._write_pos()

    def discard(self) -> None:
        """Close and delete the journal, delivered or not (its records were moved elsewhere)."""
        self._close_writer()
        self._reader.close()
        for p in (self.path, self._pos_path):
            try:
                os.remove(p)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        """Close the files; an empty, fully delivered journal is removed."""
        self._close_writer()
        self._reader.close()
        if not self.has_pending:
            for p in (self.path, self._pos_path):
                try:
                    os.remove(p)
                except FileNotFoundError:
                    pass
