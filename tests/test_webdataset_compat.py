"""Shards are webdataset tar files: `webdataset.WebDataset` itself opens a shard set built by `crescent data build`
and gets exactly the samples Crescent's own reader streams (same keys, same tokens, nothing more or less)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import webdataset as wds
from test_eval_fixtures import corpus_text

from components.data.loader import StreamLoader
from components.data.shards import build_shards
from components.data.stream import MixtureStream
from components.data.tokenizer import train_bpe


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("wds")
    (root / "src").mkdir()
    (root / "src" / "text.txt").write_text(corpus_text(200_000))
    train_bpe([str(root / "src")], vocab_size=512, out_dir=root / "tok")
    build_shards([str(root / "src")], root / "set", root / "tok", seq_len=64, shard_samples=50, seed=3)
    return root / "set"


def _webdataset_samples(shard_set) -> dict[int, np.ndarray]:
    manifest = json.loads((shard_set / "manifest.json").read_text())
    urls = [str(shard_set / s["file"]) for s in manifest["shards"]]
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    samples = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        assert {k for k in sample if not k.startswith("__")} == {"tokens"}, sorted(sample)  # one member per sample
        key = int(sample["__key__"])
        assert key not in samples
        samples[key] = np.frombuffer(sample["tokens"], dtype=dtype)
    return samples


def test_webdataset_reads_exactly_the_samples_crescent_streams(shard_set):
    manifest = json.loads((shard_set / "manifest.json").read_text())
    theirs = _webdataset_samples(shard_set)
    assert len(theirs) == manifest["samples"] and len(manifest["shards"]) > 3
    assert all(len(t) == manifest["sample_tokens"] for t in theirs.values())

    # One virtual stream reads the whole set once: every sample exactly once.
    stream = MixtureStream({"set": str(shard_set)}, {"set": 1.0}, micro_batch_size=8, num_streams=1,
                           stop_samples=manifest["samples"])
    ours = {}
    for batch in StreamLoader(stream):
        for sample_id, inputs, targets in zip(batch["sample_id"].tolist(), batch["input_ids"], batch["targets"]):
            assert sample_id not in ours
            ours[sample_id] = np.concatenate([inputs.numpy(), targets[-1:].numpy()])
    assert ours.keys() == theirs.keys()
    assert all(np.array_equal(ours[k], theirs[k].astype(np.int64)) for k in ours)
