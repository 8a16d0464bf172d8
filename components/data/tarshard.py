"""Reading and writing one shard: a ustar archive of `{sample_id:010d}.tokens` members (webdataset layout).

Writing fixes every header field that could vary (mtime 0, uid/gid 0, no user names, mode 0644, ustar), so the
same samples give the same bytes. Reading parses the 512-byte ustar headers directly (checksum verified) because
Python's `tarfile` costs ~100x more per member than copying a sample; any member that is not a plain file in
plain ustar form (a pax or GNU extension, written by another tool) hands the whole shard to webdataset's
`tarfile`-based iterator instead. Neither path raises on bad data: the result says how many samples survived.
"""
from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass

import numpy as np

SAMPLE_EXT = "tokens"
BLOCK = 512


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A deterministic ustar archive of (name, payload) members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@dataclass
class ShardSamples:
    """One shard decoded: `tokens[k]` and `sample_ids[k]` for k < `valid`; rows from `valid` on were lost."""

    tokens: np.ndarray      # [expected, seq_len + 1], the manifest's dtype
    sample_ids: np.ndarray  # [expected] int64, -1 where lost
    valid: int              # samples read intact, a prefix of the shard
    bad: int                # members present but malformed (wrong length, wrong name)
    error: str | None       # why reading stopped early (truncated / corrupt / missing), if it did


class _NeedsTarfile(Exception):
    """A member uses a tar feature the fast reader does not parse."""


def _octal(field: bytes) -> int:
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def _ustar_members(data: bytes, limit: int):
    """(name, payload offset, size) of regular members, in order; stops at the end marker, at `limit` members or
    at the first damaged header (then the last item is an error string)."""
    view = memoryview(data)
    offset, n = 0, 0
    while n < limit:
        if offset + BLOCK > len(data):
            if offset < len(data):
                yield "truncated tar header"
            return
        header = data[offset:offset + BLOCK]
        if header.count(0) == BLOCK:
            return  # end-of-archive marker
        try:
            size, checksum = _octal(header[124:136]), _octal(header[148:156])
        except ValueError:
            yield "corrupt tar header (size or checksum field)"
            return
        if checksum != int(np.frombuffer(view[offset:offset + BLOCK], np.uint8).sum()) - sum(header[148:156]) + 256:
            yield "corrupt tar header (checksum mismatch)"
            return
        if header[156:157] not in (b"0", b"\0") or header[257:262] != b"ustar":
            raise _NeedsTarfile
        name = header[:100].split(b"\0", 1)[0]
        prefix = header[345:500].split(b"\0", 1)[0]
        start = offset + BLOCK
        if start + size > len(data):
            yield "truncated tar member"
            return
        yield (prefix + b"/" + name if prefix else name).decode("utf-8", "replace"), start, size
        offset = start + -(-size // BLOCK) * BLOCK
        n += 1


def _tarfile_members(data: bytes, limit: int):
    from webdataset.tariterators import tar_file_iterator

    failure: list[BaseException] = []

    def stop(exn: BaseException) -> bool:
        failure.append(exn)
        return False

    blobs = []
    try:
        for member in tar_file_iterator(io.BytesIO(data), handler=stop):
            blobs.append((member["fname"], member["data"]))
            if len(blobs) >= limit:
                break
    except (tarfile.TarError, OSError, EOFError, ValueError) as exn:
        failure.append(exn)
    return blobs, (f"{type(failure[0]).__name__}: {failure[0]}" if failure else None)


_POW8 = 8 ** np.arange(5, -1, -1, dtype=np.int64)
_POW10 = 10 ** np.arange(9, -1, -1, dtype=np.int64)


def _decode_uniform(data: bytes, expected: int, sample_len: int, item: np.dtype,
                    ext: str = SAMPLE_EXT) -> ShardSamples | None:
    """All headers at once, for the shards we write: `expected` members of equal size named `{10 digits}.{ext}`,
    ustar, regular files, Python's checksum layout. None when anything differs (then the general reader runs)."""
    want = sample_len * item.itemsize
    stride = BLOCK + -(-want // BLOCK) * BLOCK
    if len(data) < expected * stride:
        return None
    rows = np.frombuffer(data, np.uint8, expected * stride).reshape(expected, stride)
    header = rows[:, :BLOCK]
    size_field = np.frombuffer(b"%011o\0" % want, np.uint8)
    name_tail = np.frombuffer(b"." + ext.encode() + b"\0", np.uint8)
    digits = header[:, :10].astype(np.int64) - 48
    stored = (header[:, 148:154].astype(np.int64) - 48) @ _POW8
    computed = header.sum(axis=1, dtype=np.int64) - header[:, 148:156].sum(axis=1, dtype=np.int64) + 256
    ok = ((header[:, 124:136] == size_field).all(axis=1) & (header[:, 156] == ord("0"))
          & (header[:, 257:262] == np.frombuffer(b"ustar", np.uint8)).all(axis=1) & (header[:, 345] == 0)
          & (header[:, 10:10 + len(name_tail)] == name_tail).all(axis=1) & ((digits >= 0) & (digits <= 9)).all(axis=1)
          & (header[:, 154] == 0) & (stored == computed))
    if not ok.all():
        return None
    tokens = rows[:, BLOCK:BLOCK + want].view(item)  # a strided view of the read buffer: rows are copied once,
    if not item.isnative:                             # when a batch gathers them
        tokens = tokens.astype(item.newbyteorder("="))
    return ShardSamples(tokens, digits @ _POW10, expected, 0, None)


def decode_shard(data: bytes | None, expected: int, sample_len: int, dtype: str, error: str | None = None,
                 fast: bool = True, ext: str = SAMPLE_EXT) -> ShardSamples:
    """Parse a shard's tar bytes into rows of `sample_len` values (members `*.{ext}`: `tokens`, or a chat set's
    `chat`). Never raises on bad data: what cannot be read is reported."""
    item = np.dtype(dtype).newbyteorder("<")
    if fast and data is not None and error is None:
        fast = _decode_uniform(data, expected, sample_len, item, ext)
        if fast is not None:
            return fast
    tokens = np.zeros((expected, sample_len), dtype=dtype)
    ids = np.full(expected, -1, dtype=np.int64)
    ok = bad = 0
    want = sample_len * item.itemsize

    def take(name: str, payload, size: int) -> None:
        nonlocal ok, bad
        stem, _, suffix = name.rpartition("/")[-1].partition(".")
        if suffix != ext or size != want or not stem.isdigit():
            bad += 1
            return
        tokens[ok] = payload
        ids[ok] = int(stem)
        ok += 1

    if data is not None:
        try:
            for member in _ustar_members(data, expected):
                if isinstance(member, str):
                    error = error or member
                    break
                name, start, size = member
                take(name, np.frombuffer(data, item, size // item.itemsize, start) if size == want else None, size)
        except _NeedsTarfile:
            tokens[:], ids[:], ok, bad = 0, -1, 0, 0
            blobs, failure = _tarfile_members(data, expected)
            for name, payload in blobs:
                take(name, np.frombuffer(payload, item) if len(payload) == want else None, len(payload))
            error = error or failure
    if error is None and ok + bad < expected:
        error = f"shard ended after {ok + bad} of {expected} samples"
    return ShardSamples(tokens, ids, ok, bad, error)
