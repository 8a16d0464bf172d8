"""Shard sets: packed token samples in webdataset tar shards, plus `manifest.json`.

A sample is `seq_len + 1` consecutive tokens of the document stream (documents joined by EOS), so the model
reads tokens [0, seq_len) and predicts tokens [1, seq_len]. Samples are shuffled with the seed and written as
tar members `{sample_id:010d}.tokens` (raw little-endian uint16 when the vocabulary fits, else uint32), where
`sample_id` is the sample's position in the packed (unshuffled) stream. Tar headers are fixed (mtime 0,
uid/gid 0, no user names, ustar format) so the same inputs give byte-identical shards.
"""
from __future__ import annotations

import hashlib
import json
import os
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from . import remote
from .sources import DEFAULT_ENCODINGS, SourceReport, iter_documents
from .tarshard import SAMPLE_EXT, decode_shard, tar_bytes
from .tokenizer import Tokenizer, load_tokenizer

FORMAT = "crescent.shards.v1"
MANIFEST = "manifest.json"


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


# ---------------------------------------------------------------------------------------------- tokenizing
_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_dir: str, pool_worker: bool = True) -> None:
    global _worker_tokenizer
    if pool_worker:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already; no nested thread pools
    _worker_tokenizer = load_tokenizer(tokenizer_dir)


def _tokenize_chunk(texts: list[str]) -> tuple[np.ndarray, int]:
    """(token ids of the documents, each followed by EOS, as one uint32 array; number of documents)."""
    tok = _worker_tokenizer
    pieces = []
    for ids in tok.encode_batch(texts):
        pieces.append(np.asarray(ids, dtype=np.uint32))
        pieces.append(np.asarray([tok.eos_id], dtype=np.uint32))
    return (np.concatenate(pieces) if pieces else np.zeros(0, np.uint32)), len(texts)


def _chunks(docs, size: int):
    chunk: list[str] = []
    for doc in docs:
        chunk.append(doc)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def tokenize_sources(sources: list[str], tokenizer_dir: str, workers: int = 1, text_field: str = "text",
                     progress: bool = False, num_slices: int = 1, slice_index: int = 0, *,
                     encodings: tuple[str, ...] = DEFAULT_ENCODINGS, on_bad_record: str = "skip",
                     report: SourceReport | None = None) -> tuple[np.ndarray, int]:
    """(token stream, document count): every document tokenized in order and terminated by EOS.

    With num_slices > 1 only documents k with k % num_slices == slice_index are kept: the slices of one source list
    are disjoint and together cover it (each index of a Kubernetes Indexed Job builds one). What the sources skip
    goes to `report` (components.data.sources).
    """
    from tqdm import tqdm

    docs = iter_documents(sources, text_field, encodings=encodings, on_bad_record=on_bad_record, report=report)
    if num_slices > 1:
        docs = (doc for k, doc in enumerate(docs) if k % num_slices == slice_index)
    bar = tqdm(desc="tokenize", unit="doc", disable=not progress)
    arrays, n_docs = [], 0
    if workers <= 1:
        _init_worker(tokenizer_dir, pool_worker=False)  # in-process: HF tokenizers may use its own threads
        stream = map(_tokenize_chunk, _chunks(docs, 64))
        pool = None
    else:
        # fork: workers start in ~0.1 s (spawn re-imports everything). Without the variable set at fork time, HF
        # tokenizers warns in each child if the parent already ran its thread pool (e.g. trained the tokenizer).
        previous = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            pool = get_context("fork").Pool(workers, initializer=_init_worker, initargs=(tokenizer_dir,))
        finally:
            if previous is None:
                os.environ.pop("TOKENIZERS_PARALLELISM")
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = previous
        stream = pool.imap(_tokenize_chunk, _chunks(docs, 64))  # imap keeps document order
    try:
        for arr, n in stream:
            arrays.append(arr)
            n_docs += n
            bar.update(n)
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    tokens = np.concatenate(arrays) if arrays else np.zeros(0, np.uint32)
    return tokens, n_docs


# ---------------------------------------------------------------------------------------------- writing
def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def build_shards(sources: list[str], out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike,
                 seq_len: int = 256, shard_samples: int = 1024, seed: int = 0, workers: int = 1,
                 text_field: str = "text", name: str | None = None, progress: bool = False,
                 num_slices: int = 1, slice_index: int = 0, encodings: tuple[str, ...] = DEFAULT_ENCODINGS,
                 on_bad_record: str = "skip", report: SourceReport | None = None) -> dict:
    """Tokenize `sources`, pack into samples of seq_len+1 tokens, shuffle with `seed`, write shards + manifest.

    Returns the manifest. The tail of the token stream that does not fill a whole sample is dropped (and counted
    in `dropped_tokens`). Input the sources skip (binary, undecodable, malformed records, empty files; see
    components.data.sources) is counted with its reasons in the manifest's `input` entry (and in `report`). Nothing
    is written, `out_dir` not even created, before the samples are ready. The build holds its token stream in
    memory: build a very large corpus as several shard sets (one per part, e.g. one per Kubernetes Indexed Job
    index) rather than one.
    """
    for field, value, low in (("seq_len", seq_len, 1), ("shard_samples", shard_samples, 1), ("workers", workers, 0)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{field}={value!r} must be an integer >= {low}")
    if not sources:
        raise ValueError("sources=[] : give at least one text file, directory, glob, JSONL or parquet file")
    if not isinstance(num_slices, int) or num_slices < 1:
        raise ValueError(f"num_slices={num_slices!r} must be an integer >= 1")
    if not isinstance(slice_index, int) or not 0 <= slice_index < num_slices:
        raise ValueError(f"slice_index={slice_index!r} must be in [0, num_slices={num_slices})")
    tokenizer_dir = str(tokenizer_dir)
    tok = load_tokenizer(tokenizer_dir)
    out = str(out_dir)  # a local directory or a URL prefix (s3://bucket/set)
    report = report if report is not None else SourceReport()
    stream, n_docs = tokenize_sources(list(sources), tokenizer_dir, workers, text_field, progress,
                                      num_slices=num_slices, slice_index=slice_index, encodings=encodings,
                                      on_bad_record=on_bad_record, report=report)
    sample_len = seq_len + 1
    n_samples = len(stream) // sample_len
    if n_samples == 0:
        skipped = ", ".join(f"{v['count']} {k.replace('_', ' ')}" for k, v in report.to_dict()["skipped"].items())
        raise ValueError(f"sources hold {len(stream)} tokens, fewer than one sample of seq_len+1={sample_len} "
                         f"({report.files} files, {n_docs} documents{'; skipped: ' + skipped if skipped else ''})")
    samples = stream[: n_samples * sample_len].astype(token_dtype(tok.vocab_size)).reshape(n_samples, sample_len)
    info = {"sources": [str(s) for s in sources], "text_field": text_field, "tokenizer": tok.describe(),
            "documents": n_docs, "dropped_tokens": int(len(stream) - n_samples * sample_len),
            "slice": {"index": slice_index, "count": num_slices}, "input": report.to_dict()}
    return write_shards(samples, out, seed=seed, shard_samples=shard_samples, name=name or _set_name(out),
                        info=info)


def write_shards(samples: np.ndarray, out_dir: str | os.PathLike, *, seed: int, shard_samples: int,
                 name: str | None, info: dict, seq_len: int | None = None, ext: str = SAMPLE_EXT) -> dict:
    """Shuffle packed samples [n, seq_len+1] with `seed`, write the tar shards and `manifest.json` (into a local
    directory or under a URL prefix; each file appears whole, see `remote.write_bytes`).

    Chat sets (components/data/chat_build.py) pass rows of another width with their `seq_len`, the member
    extension `ext` and `info["chat"]`, recorded as the manifest's `kind: chat` and `chat` entries."""
    out = str(out_dir)
    remote.make_dirs(out)
    n_samples, sample_len = samples.shape
    seq_len = sample_len - 1 if seq_len is None else seq_len
    dtype = str(samples.dtype)
    order = np.random.default_rng(seed).permutation(n_samples)
    little = np.dtype(dtype).newbyteorder("<")
    shards = []
    for index, start in enumerate(range(0, n_samples, shard_samples)):
        ids = order[start:start + shard_samples]
        members = [(f"{int(i):010d}.{ext}", samples[i].astype(little).tobytes()) for i in ids]
        data = tar_bytes(members)
        remote.write_bytes(remote.join(out, shard_name(index)), data)
        shards.append({"file": shard_name(index), "samples": len(ids), "tokens": len(ids) * (seq_len + 1),
                       "sha256": hashlib.sha256(data).hexdigest()})
    keep = {s["file"] for s in shards}
    for stale in remote.list_names(out, "shard-*.tar"):
        if stale not in keep:
            remote.remove(remote.join(out, stale))
    manifest = {
        "format": FORMAT,
        "name": name or _set_name(out),
        "seq_len": seq_len,
        "sample_tokens": sample_len,
        "dtype": dtype,
        "seed": seed,
        "sources": info.get("sources", []),
        "text_field": info.get("text_field", "text"),
        "tokenizer": info["tokenizer"],
        "documents": info.get("documents", 0),
        "samples": n_samples,
        "tokens": n_samples * (seq_len + 1),
        "dropped_tokens": info.get("dropped_tokens", 0),
        "shard_samples": shard_samples,
        "shards": shards,
    }
    if "input" in info:
        manifest["input"] = info["input"]  # files read, documents, what was skipped and why
    if "chat" in info:
        manifest.update(kind="chat", sample_ext=ext, chat=info["chat"])
    remote.write_bytes(remote.join(out, MANIFEST), (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


def _set_name(location: str) -> str:
    """The default name of a shard set: its directory's (or URL prefix's) last component."""
    return location.rstrip("/").rsplit("/", 1)[-1] if remote.is_url(location) else Path(location).resolve().name


# ---------------------------------------------------------------------------------------------- reading
def read_manifest(location: str) -> dict:
    """The manifest of a shard set (a local directory or a URL prefix). Clear error when missing or malformed."""
    path = remote.join(location, MANIFEST)
    try:
        manifest = json.loads(remote.read_bytes(path))
    except FileNotFoundError as err:
        raise ValueError(f"shard set {location!r}: no {MANIFEST} at {path!r}") from err
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"shard set {location!r}: cannot read {path!r}: {err}") from err
    if manifest.get("format") != FORMAT:
        raise ValueError(f"shard set {location!r}: format={manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def inspect_shard_set(location: str, verify: bool = False, tokenizer: str | None = None, show: int = 0) -> dict:
    """Summary of a shard set. `verify` reads every shard: sha256 and intact sample counts against the manifest.
    With `tokenizer`, checks its fingerprint and decodes the start of the first sample (`preview`)."""
    manifest = read_manifest(location)
    info = {
        "location": location, "name": manifest["name"], "seq_len": manifest["seq_len"], "dtype": manifest["dtype"],
        "samples": manifest["samples"], "tokens": manifest["tokens"], "shards": len(manifest["shards"]),
        "documents": manifest["documents"], "seed": manifest["seed"], "sources": manifest["sources"],
        "tokenizer": manifest["tokenizer"],
    }
    if verify:
        corrupt = []
        for entry in manifest["shards"]:
            url = remote.join(location, entry["file"])
            try:
                data = remote.read_bytes(url)
            except OSError as err:
                corrupt.append({"file": entry["file"], "error": f"{type(err).__name__}: {err}"})
                continue
            shard = decode_shard(data, entry["samples"], manifest["sample_tokens"], manifest["dtype"])
            digest = hashlib.sha256(data).hexdigest()
            if digest != entry["sha256"] or shard.valid != entry["samples"]:
                corrupt.append({"file": entry["file"], "sha256_ok": digest == entry["sha256"],
                                "intact_samples": shard.valid, "expected_samples": entry["samples"],
                                "error": shard.error})
        info["verified_shards"] = len(manifest["shards"]) - len(corrupt)
        info["corrupt_shards"] = corrupt
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
        info["tokenizer_matches"] = tok.fingerprint == manifest["tokenizer"]["fingerprint"]
        entry = manifest["shards"][0]
        shard = decode_shard(remote.read_bytes(remote.join(location, entry["file"])), entry["samples"],
                             manifest["sample_tokens"], manifest["dtype"])
        if shard.valid:
            ids = shard.tokens[0][: show or 64].tolist()
            info["preview"] = tok.decode(ids)
    return info
