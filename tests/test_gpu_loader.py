"""On CUDA: the loader's pinned-memory path (components/data/packing.py widens each group of micro-batches straight
into pinned memory when CUDA is there): the same batches as without pinning, pinned, and the same numbers on the
device after a non-blocking copy. Skipped without CUDA; bench/gpu_suite.sh runs them."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gpu_helpers import CUDA

from components.data.loader import StreamLoader
from components.data.shards import write_shards
from components.data.stream import MixtureStream

pytestmark = pytest.mark.gpu

SEQ = 64


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("pinned") / "tokens"
    samples = np.random.default_rng(0).integers(0, 30_000, (96, SEQ + 1)).astype(np.uint16)
    write_shards(samples, out, seed=0, shard_samples=16, name="tokens", info={"tokenizer": {"fingerprint": "x"}})
    return out


def _batches(location, pin: bool, workers: int) -> list[dict]:
    stream = MixtureStream({"tokens": str(location)}, {"tokens": 1.0}, num_workers=workers, micro_batch_size=4,
                           num_streams=8, stop_samples=96)
    return list(StreamLoader(stream, pin_memory=pin))


@pytest.mark.parametrize("workers", [0, 2])
def test_pinned_batches_equal_unpinned_ones_and_reach_the_gpu_intact(shard_set, workers):
    plain, pinned = _batches(shard_set, False, workers), _batches(shard_set, True, workers)
    assert len(plain) == len(pinned) == 24
    for a, b in zip(plain, pinned):
        assert b["input_ids"].is_pinned() and b["targets"].is_pinned()
        # contiguous: a strided pinned view is gathered into pageable memory first, and its copy is synchronous
        assert b["input_ids"].is_contiguous() and b["targets"].is_contiguous()
        assert not a["input_ids"].is_pinned()
        for key in ("input_ids", "targets", "index", "sample_id"):
            assert torch.equal(a[key], b[key]), key
        on_gpu = b["input_ids"].to(CUDA, non_blocking=True)
        torch.cuda.synchronize()
        assert on_gpu.dtype == torch.int32 and torch.equal(on_gpu.cpu(), a["input_ids"])
