"""Shard building: sources, packing into seq_len+1 samples, deterministic tar shards and the manifest."""
import gzip
import hashlib
import json
import tarfile

import numpy as np
import pytest

from components.data.shards import build_shards, read_manifest
from components.data.sources import source_files
from components.data.tarshard import decode_shard
from components.data.tokenizer import TiktokenTokenizer, load_tokenizer, train_bpe

DOCS = [f"Document {i}: " + " ".join(f"word{(i * 7 + j) % 50}" for j in range(40 + i % 13)) for i in range(60)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "txt").mkdir()
    for i, doc in enumerate(DOCS[:20]):
        (root / "txt" / f"doc{i:02d}.txt").write_text(doc)
    with gzip.open(root / "docs.jsonl.gz", "wt") as f:
        for doc in DOCS[20:40]:
            f.write(json.dumps({"text": doc, "id": 1}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": DOCS[40:]}), root / "docs.parquet")
    pq.write_table(pa.table({"content": DOCS[40:]}), root / "content.parquet")
    tok_dir = root / "tok"
    train_bpe(DOCS, vocab_size=320, out_dir=tok_dir)
    return root, tok_dir


def sources_of(root):
    return [str(root / "txt"), str(root / "docs.jsonl.gz"), str(root / "docs.parquet")]


def test_build_packs_all_sources_and_writes_manifest(corpus, tmp_path):
    root, tok_dir = corpus
    manifest = build_shards(sources_of(root), tmp_path / "set", tok_dir, seq_len=16, shard_samples=10,
                            seed=3, text_field="text")
    tok = load_tokenizer(tok_dir)
    expected = sum(len(tok.encode(d)) + 1 for d in DOCS)  # every document plus its EOS
    assert manifest["documents"] == 60
    assert manifest["tokens"] + manifest["dropped_tokens"] == expected
    assert manifest["samples"] == expected // 17 and manifest["dropped_tokens"] == expected % 17
    assert sum(s["samples"] for s in manifest["shards"]) == manifest["samples"]
    assert manifest["dtype"] == "uint16" and manifest["tokenizer"]["fingerprint"] == tok.fingerprint
    for entry in manifest["shards"]:
        data = (tmp_path / "set" / entry["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        with tarfile.open(fileobj=__import__("io").BytesIO(data)) as tar:
            infos = tar.getmembers()
        assert all(i.mtime == 0 and i.uid == 0 and i.uname == "" for i in infos)
        assert len(infos) == entry["samples"] and all(i.name.endswith(".tokens") for i in infos)
    assert read_manifest(str(tmp_path / "set")) == manifest


def test_parquet_column_is_read_by_text_field(corpus, tmp_path):
    root, tok_dir = corpus
    with pytest.raises(ValueError, match="no column 'text'"):
        build_shards([str(root / "content.parquet")], tmp_path / "p", tok_dir, seq_len=16)
    manifest = build_shards([str(root / "content.parquet")], tmp_path / "p", tok_dir, seq_len=16,
                            text_field="content")
    assert manifest["documents"] == 20


def test_rebuild_is_byte_identical_with_any_worker_count(corpus, tmp_path):
    root, tok_dir = corpus
    a = build_shards(sources_of(root)[:2], tmp_path / "a", tok_dir, seq_len=16, shard_samples=7, seed=5, name="x")
    b = build_shards(sources_of(root)[:2], tmp_path / "b", tok_dir, seq_len=16, shard_samples=7, seed=5, name="x",
                     workers=2)
    assert a == b
    for entry in a["shards"]:
        assert (tmp_path / "a" / entry["file"]).read_bytes() == (tmp_path / "b" / entry["file"]).read_bytes()
    c = build_shards(sources_of(root)[:2], tmp_path / "c", tok_dir, seq_len=16, shard_samples=7, seed=6, name="x")
    assert [s["sha256"] for s in c["shards"]] != [s["sha256"] for s in a["shards"]]


def test_large_vocab_is_stored_as_uint32(tmp_path):
    ranks = {bytes([i]): i for i in range(256)}
    for a in range(256):
        for b in range(256):
            if len(ranks) < 70000 and (a, b) != (0, 0):
                ranks.setdefault(bytes([a, b]), len(ranks))
    TiktokenTokenizer(ranks, ["[BOS]", "[EOS]"]).save(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.vocab_size > 65536
    (tmp_path / "docs").mkdir()
    for i in range(8):
        (tmp_path / "docs" / f"{i}.txt").write_text("zzzz~~~~" * 4)
    manifest = build_shards([str(tmp_path / "docs")], tmp_path / "set", tmp_path / "tok", seq_len=8)
    assert manifest["dtype"] == "uint32"
    entry = manifest["shards"][0]
    shard = decode_shard((tmp_path / "set" / entry["file"]).read_bytes(), entry["samples"], 9, "uint32")
    assert shard.valid == entry["samples"] and shard.tokens.max() == tok.eos_id > 65536


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        source_files(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="matches no files"):
        source_files(str(tmp_path / "*.nothing"))
    (tmp_path / "x.jsonl").write_text('{"body": "hi"}\n')
    train_bpe(["hello world"], 260, tmp_path / "tok")
    with pytest.raises(ValueError, match="x.jsonl:1: no field 'text'"):
        build_shards([str(tmp_path / "x.jsonl")], tmp_path / "o", tmp_path / "tok", on_bad_record="fail")
    with pytest.raises(ValueError, match="sources hold 0 tokens.*skipped: 1 bad records"):  # skipped by default
        build_shards([str(tmp_path / "x.jsonl")], tmp_path / "o", tmp_path / "tok")
    with pytest.raises(ValueError, match="seq_len=0 must be an integer >= 1"):
        build_shards([str(tmp_path / "x.jsonl")], tmp_path / "o", tmp_path / "tok", seq_len=0)


def test_decode_shard_reports_truncation_without_raising(corpus, tmp_path):
    root, tok_dir = corpus
    manifest = build_shards(sources_of(root), tmp_path / "s", tok_dir, seq_len=16, shard_samples=10)
    data = (tmp_path / "s" / "shard-000000.tar").read_bytes()
    member = 512 + 512  # header + 34 data bytes padded to one block
    cut = 3 * member + 300  # three whole samples, then part of the fourth header
    shard = decode_shard(data[:cut], 10, 17, "uint16")
    assert shard.valid == 3 and shard.error is not None
    assert np.array_equal(shard.tokens[:3], decode_shard(data, 10, 17, "uint16").tokens[:3])
    assert manifest["shards"][0]["samples"] == 10


def test_fast_and_general_shard_readers_agree(corpus, tmp_path):
    root, tok_dir = corpus
    manifest = build_shards(sources_of(root), tmp_path / "s", tok_dir, seq_len=16, shard_samples=10)
    for entry in manifest["shards"]:
        data = (tmp_path / "s" / entry["file"]).read_bytes()
        fast = decode_shard(data, entry["samples"], 17, "uint16")
        general = decode_shard(data, entry["samples"], 17, "uint16", fast=False)
        assert fast.valid == general.valid == entry["samples"] and fast.error is None and general.error is None
        assert np.array_equal(fast.tokens, general.tokens) and np.array_equal(fast.sample_ids, general.sample_ids)
    ids = np.concatenate([decode_shard((tmp_path / "s" / e["file"]).read_bytes(), e["samples"], 17, "uint16")
                          .sample_ids for e in manifest["shards"]])
    assert sorted(ids.tolist()) == list(range(manifest["samples"]))
