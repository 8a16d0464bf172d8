"""Building chat shard sets: tulu-3-style records from JSONL or parquet, checked, encoded, packed, written.

A record is `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}` (other fields, e.g.
tulu-3-sft-mixture's `id` and `source`, are ignored), one per JSONL line (`.jsonl`, `.jsonl.gz`) or parquet row
(a `messages` column, as `datasets` exports it). Sources are local files, directories, globs, or single objects
in object storage (`s3://...`, `gs://...`, `https://...`; through `remote.read_bytes`).

Bad records are skipped and counted with their reason (`ChatReport`, kept in the manifest): not JSON, not an
object, no messages, a message that is not an object, a missing or unknown role, non-string or empty content, no
assistant turn. A file with no valid record is an error naming the file and what was wrong with its records.
Conversations longer than seq_len + 1 tokens are truncated (counted; dropped when nothing to learn is left) or
dropped (`too_long="drop"`).
"""
from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import remote
from .chat import (
    PACKING,
    ROLES,
    ROW_EXT,
    TOO_LONG,
    ChatEncoder,
    get_template,
    pack_lengths,
    pack_rows,
    row_dtype,
)
from .shards import write_shards
from .sources import BAD_RECORD_POLICIES, count_with_example, source_files
from .tokenizer import load_tokenizer

REASONS = ("not_json", "not_an_object", "no_messages", "bad_message", "missing_role", "unknown_role",
           "non_string_content", "empty_content", "no_assistant_turn")


@dataclass
class ChatReport:
    """What reading and packing did: records read, skipped per reason (with the first few places), truncations."""

    files: int = 0
    records: int = 0
    conversations: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_target: int = 0

    def note(self, reason: str, where: str) -> None:
        count_with_example(self.skipped, self.examples, reason, where)

    def to_dict(self) -> dict:
        return {"files": self.files, "records": self.records, "conversations": self.conversations,
                "skipped": {k: {"count": v, "first": list(self.examples.get(k, []))} for k, v in self.skipped.items()},
                "truncated": self.truncated, "dropped_too_long": self.dropped_too_long,
                "dropped_no_target": self.dropped_no_target}

    def summary(self) -> list[str]:
        lines = [f"skipped {reason.replace('_', ' ')}: {n}" for reason, n in sorted(self.skipped.items())]
        for label, n in (("truncated (too long)", self.truncated), ("dropped (too long)", self.dropped_too_long),
                         ("dropped (no target left after truncation)", self.dropped_no_target)):
            if n:
                lines.append(f"{label}: {n}")
        return lines


def check_messages(record) -> tuple[list[dict] | None, str | None, str]:
    """(messages, None, "") for a valid record, else (None, reason, detail)."""
    if not isinstance(record, dict):
        return None, "not_an_object", f"a JSON {type(record).__name__}"
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        return None, "no_messages", f"messages={json.dumps(messages, default=str)[:40]}"
    clean = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            return None, "bad_message", f"messages[{k}] is a {type(m).__name__}"
        if "role" not in m or m["role"] is None:
            return None, "missing_role", f"messages[{k}] has no role"
        if m["role"] not in ROLES:
            return None, "unknown_role", f"messages[{k}].role={str(m['role'])[:20]!r}, allowed: {ROLES}"
        content = m.get("content")
        if not isinstance(content, str):
            return None, "non_string_content", f"messages[{k}].content is {type(content).__name__}"
        if not content.strip():
            return None, "empty_content", f"messages[{k}] ({m['role']}) has empty content"
        clean.append({"role": m["role"], "content": content})
    if not any(m["role"] == "assistant" for m in clean):
        return None, "no_assistant_turn", "no assistant message"
    return clean, None, ""


def _files(spec: str) -> list[str]:
    return [spec] if remote.is_url(spec) else [str(p) for p in source_files(spec)]


def _raw_records(location: str) -> Iterator[tuple[str, object]]:
    """(where, parsed record or a ValueError) per line / row of one file."""
    name = location.rsplit("/", 1)[-1]
    data = remote.read_bytes(location) if remote.is_url(location) else Path(location).read_bytes()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.ParquetFile(io.BytesIO(data))
        if "messages" not in table.schema_arrow.names:
            raise ValueError(f"{location}: no column 'messages' (columns: {table.schema_arrow.names[:10]})")
        row = 0
        for batch in table.iter_batches(columns=["messages"], batch_size=4096):
            for value in batch.column(0).to_pylist():
                row += 1
                yield f"{location}: row {row}", {"messages": value}
        return
    if name.endswith(".gz"):
        data = gzip.decompress(data)
    for lineno, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            yield f"{location}:{lineno}", json.loads(raw)
        except ValueError as err:
            yield f"{location}:{lineno}", ValueError(f"not JSON ({err})")


def iter_conversations(sources: list[str], report: ChatReport, on_bad_record: str = "skip") -> Iterator[list[dict]]:
    """The valid conversations of every source, in order; skips go to `report`. A file without one valid record
    is a ValueError."""
    if on_bad_record not in BAD_RECORD_POLICIES:
        raise ValueError(f"on_bad_record={on_bad_record!r} must be one of {BAD_RECORD_POLICIES}")
    files = [f for spec in sources for f in _files(spec)]  # every spec is checked before reading any
    for location in files:
        report.files += 1
        valid, before = 0, dict(report.skipped)
        for where, record in _raw_records(location):
            report.records += 1
            if isinstance(record, ValueError):
                messages, reason, detail = None, "not_json", str(record)
            else:
                messages, reason, detail = check_messages(record)
            if messages is None:
                if on_bad_record == "fail":
                    raise ValueError(f"{where}: {reason}: {detail} (use --on-bad-record skip to skip such records)")
                report.note(reason, f"{where}: {detail}")
                continue
            valid += 1
            yield messages
        if not valid:
            why = ", ".join(f"{n - before.get(r, 0)} {r}" for r, n in report.skipped.items() if n > before.get(r, 0))
            raise ValueError(f"{location}: no valid chat record ({why or 'the file is empty'}); expected JSONL lines "
                             "or parquet rows {\"messages\": [{\"role\": \"user\"|\"assistant\"|\"system\", "
                             "\"content\": \"...\"}, ...]} with an assistant turn")


def encode_and_fit(encoder: ChatEncoder, conversations: list[list[dict]], capacity: int, too_long: str,
                   report: ChatReport, chunk: int = 256) -> list[tuple[np.ndarray, np.ndarray]]:
    """Encoded conversations that fit `capacity` token slots (truncated or dropped per `too_long`, counted)."""
    if too_long not in TOO_LONG:
        raise ValueError(f"too_long={too_long!r} must be one of {TOO_LONG}")
    kept = []
    for start in range(0, len(conversations), chunk):
        for ids, target in encoder.encode_many(conversations[start:start + chunk]):
            if len(ids) > capacity:
                if too_long == "drop":
                    report.dropped_too_long += 1
                    continue
                ids, target = ids[:capacity], target[:capacity]
                if not target[1:].any():
                    report.dropped_no_target += 1
                    continue
                report.truncated += 1
            kept.append((ids, target))
    return kept


def build_chat_shards(sources: list[str], out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike, *,
                      template: str = "moonlight", seq_len: int = 256, shard_samples: int = 1024, seed: int = 0,
                      packing: str = "best_fit", too_long: str = "truncate", on_bad_record: str = "skip",
                      name: str | None = None, report: ChatReport | None = None) -> dict:
    """Read, check, encode and pack chat records into a chat shard set (rows: see components.data.chat); returns
    the manifest. Nothing is written before the rows are ready."""
    for key, value, low in (("seq_len", seq_len, 1), ("shard_samples", shard_samples, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{key}={value!r} must be an integer >= {low}")
    if packing not in PACKING:
        raise ValueError(f"packing={packing!r} must be one of {PACKING}")
    if not sources:
        raise ValueError("sources=[] : give at least one JSONL or parquet file of chat records")
    chat_template = get_template(template)
    tok = load_tokenizer(tokenizer_dir)
    encoder = ChatEncoder(tok, chat_template)
    report = report if report is not None else ChatReport()
    conversations = list(iter_conversations(list(sources), report, on_bad_record))
    encoded = encode_and_fit(encoder, conversations, seq_len + 1, too_long, report)
    report.conversations = len(encoded)
    if not encoded:
        raise ValueError(f"no conversation is left to pack ({report.dropped_too_long} too long for seq_len+1="
                         f"{seq_len + 1}, {report.dropped_no_target} without a target after truncation)")
    groups = pack_lengths([len(ids) for ids, _ in encoded], seq_len + 1, packing)
    rows = pack_rows(encoded, groups, seq_len, tok.eos_id, row_dtype(tok.vocab_size, seq_len))
    real = sum(len(ids) for ids, _ in encoded)
    targets = int(sum(t[1:].sum() for _, t in encoded))
    info = {"sources": [str(s) for s in sources], "text_field": "messages", "tokenizer": tok.describe(),
            "documents": len(encoded), "input": report.to_dict(),
            "chat": {"template": chat_template.name, "packing": packing, "too_long": too_long,
                     "conversations": len(encoded), "real_tokens": real, "target_tokens": targets,
                     "packing_efficiency": real / (len(rows) * (seq_len + 1)),
                     "row": "tokens[seq_len+1] then flags[seq_len+1], flag = segment << 1 | is_target"}}
    return write_shards(rows, out_dir, seed=seed, shard_samples=shard_samples, name=name, info=info,
                        seq_len=seq_len, ext=ROW_EXT)
