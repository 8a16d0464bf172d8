"""Streaming loader throughput against reading the same shard bytes sequentially, in the same run.

1. Build: tokenize real text (the interpreter's standard library) into shards; report build tokens/s.
2. A synthetic shard set of seq_len 2048 samples (uint16), written with the same shard writer.
3. Raw: evict the shard files from the page cache (fsync + posix_fadvise DONTNEED), read them sequentially
   (plain `read()`), tokens/s from the payload; then again from the page cache, for reference.
4. Stream: evict again, then `StreamLoader(MixtureStream(...))`, 2 workers, micro-batch 8 x 2048, one pass over
   the same samples, tokens/s counting the `input_ids` delivered to the main process (worker start-up included).
5. Reference: a plain webdataset pipeline over the same shards (`WebDataset | decode | batched`, `WebLoader`
   with the same workers and batch), from a cold cache too: what the custom reader buys over the library's own
   (webdataset knows no mixture, no exact resume; it only reads).
Last line: `stream_efficiency: <stream tokens/s / disk-read tokens/s>` (goal >= 0.5).

The default 65536 samples (134M tokens, 270 MB of shards) make the one-off worker start-up a small part of the
pass, as it is in training.

    python -m bench.stream [--samples 65536] [--workers 2]
"""
from __future__ import annotations

import argparse
import os
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from components.data.loader import StreamLoader
from components.data.shards import build_shards, write_shards
from components.data.stream import MixtureStream
from components.data.tokenizer import train_bpe


def bench_build(root: Path, workers: int) -> tuple[int, float]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    sources = [str(lib / "json"), str(lib / "email"), str(lib / "asyncio")]
    tok_dir = root / "tok"
    train_bpe([str(lib / "json")], vocab_size=4096, out_dir=tok_dir)
    start = time.perf_counter()
    manifest = build_shards(sources, root / "built", tok_dir, seq_len=2048, shard_samples=64, workers=workers)
    return manifest["tokens"] + manifest["dropped_tokens"], time.perf_counter() - start


def drop_page_cache(files: list[Path]) -> None:
    """Evict the shards from the page cache (fsync first: dirty pages cannot be dropped), so reads hit the disk."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_sequentially(files: list[Path]) -> tuple[float, int]:
    start = time.perf_counter()
    total = 0
    for f in files:
        with open(f, "rb") as handle:
            total += len(handle.read())
    return time.perf_counter() - start, total


def read_with_webdataset(files: list[Path], workers: int, batch: int, dtype: str) -> tuple[int, float]:
    """(tokens delivered, seconds) through a plain webdataset pipeline: shards split over the workers by
    webdataset's own splitter, each sample's bytes decoded to a tensor, batched in the workers."""
    little = np.dtype(dtype).newbyteorder("<")

    def decode(sample):
        return torch.from_numpy(np.frombuffer(sample["tokens"], dtype=little).astype(np.int64))

    dataset = wds.WebDataset([str(f) for f in files], shardshuffle=False, empty_check=False).map(decode)
    loader = wds.WebLoader(dataset.batched(batch, collation_fn=torch.stack), batch_size=None, num_workers=workers)
    start = time.perf_counter()
    delivered = sum(int(b[:, :-1].numel()) for b in loader)  # the input_ids part, as counted for the stream
    return delivered, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=65536, help="synthetic samples of 2049 tokens")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--shard-samples", type=int, default=128)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="crescent-bench-") as tmp:
        root = Path(tmp)
        build_tokens, build_s = bench_build(root, args.workers)

        rng = np.random.default_rng(0)
        samples = rng.integers(0, 4096, size=(args.samples, args.seq_len + 1), dtype=np.uint16)
        tokenizer = {"backend": "synthetic", "fingerprint": "synthetic", "vocab_size": 4096, "eos_id": 0,
                     "bos_id": None}
        manifest = write_shards(samples, root / "set", seed=0, shard_samples=args.shard_samples, name="set",
                                info={"tokenizer": tokenizer})
        files = [root / "set" / s["file"] for s in manifest["shards"]]

        raw_tokens = manifest["tokens"]
        drop_page_cache(files)
        raw_s, read_bytes = read_sequentially(files)
        warm_s, _ = read_sequentially(files)
        drop_page_cache(files)

        inline = MixtureStream({"set": str(root / "set")}, {"set": 1.0}, micro_batch_size=args.batch,
                               stop_samples=args.samples)
        start = time.perf_counter()
        inline_tokens = sum(batch["input_ids"].numel() for batch in StreamLoader(inline))
        inline_s = time.perf_counter() - start
        drop_page_cache(files)

        stream = MixtureStream({"set": str(root / "set")}, {"set": 1.0}, num_workers=args.workers,
                               micro_batch_size=args.batch, num_streams=16 * args.batch * max(1, args.workers),
                               stop_samples=args.samples)
        loader = StreamLoader(stream)
        start = time.perf_counter()
        delivered, first_s = 0, None
        for batch in loader:
            delivered += batch["input_ids"].numel()
            first_s = time.perf_counter() - start if first_s is None else first_s
        stream_s = time.perf_counter() - start
        drop_page_cache(files)
        wds_tokens, wds_s = read_with_webdataset(files, args.workers, args.batch, manifest["dtype"])

    rows = [
        ("build (tokenize + pack + write)", build_tokens, build_s),
        ("raw sequential read from disk (cache dropped)", raw_tokens, raw_s),
        ("raw sequential read again (page cache)", raw_tokens, warm_s),
        (f"stream in the main process (0 workers), batch {args.batch}", inline_tokens, inline_s),
        (f"stream ({args.workers} workers, batch {args.batch}x{args.seq_len})", delivered, stream_s),
        (f"plain webdataset ({args.workers} workers, batch {args.batch})", wds_tokens, wds_s),
    ]
    print(f"{'what':45s} {'tokens':>12s} {'seconds':>9s} {'tokens/s':>14s}")
    for name, tokens, seconds in rows:
        print(f"{name:45s} {tokens:12d} {seconds:9.3f} {tokens / seconds:14,.0f}")
    print(f"raw read: {read_bytes / raw_s / 1e6:,.0f} MB/s over {len(files)} shards; cpu count {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"first batch after {first_s:.3f} s (worker start-up, included above)")
    print(f"build_tokens_per_s: {build_tokens / build_s:.0f}")
    print(f"stream / page-cache read: {(delivered / stream_s) / (raw_tokens / warm_s):.3f}")
    print(f"stream / plain webdataset: {(delivered / stream_s) / (wds_tokens / wds_s):.3f}")
    efficiency = (delivered / stream_s) / (raw_tokens / raw_s)
    print(f"stream_efficiency: {efficiency:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
