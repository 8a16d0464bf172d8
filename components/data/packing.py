"""Moving micro-batches from DataLoader workers to the training process cheaply, in order.

torch sends every tensor a worker yields through its own shared-memory segment, a fixed cost of about a
millisecond per tensor on a busy host. So a worker packs `group` of its micro-batches into ONE int32 tensor
[group, b, 2 * META + seq_len + 1]: per row five int64 header columns stored as int32 pairs (global index,
set_id or LOST / PADDING, sample_id, lost_samples, bad_shards) and then the tokens. The training process
(`StreamLoader`) puts the micro-batches back into rank order by their ordinal, computed from the global index of
their first row, drops lost and padding rows, and widens tokens to int64.
"""
from __future__ import annotations

import numpy as np
import torch

META = 5
LOST, PADDING = -1, -2


def pack_micro_batch(index: np.ndarray, samples: list, counters: tuple[int, int], batch: int, seq_len: int
                     ) -> np.ndarray:
    packed = np.zeros((batch, 2 * META + seq_len + 1), dtype=np.int32)
    header = packed[:, : 2 * META].view(np.int64)
    header[:, 1] = PADDING
    header[: len(index), 0] = index
    for r, found in enumerate(samples):
        if found is None:
            header[r, 1] = LOST
        else:
            _, set_id, row, sample_id = found
            header[r, 1:3] = (set_id, sample_id)
            packed[r, 2 * META:] = row
    header[0, 3:5] = counters
    return packed


def iter_groups(stream, group: int):
    """In a worker: `group` micro-batches at a time as one tensor (the last group may be shorter)."""
    pending = []
    for reader, index, samples in stream.micro_batches(group):
        pending.append(pack_micro_batch(index, samples, reader.take_counters(), stream.micro_batch_size,
                                        stream.seq_len))
        if len(pending) == group:
            yield torch.from_numpy(np.stack(pending))
            pending = []
    if pending:
        yield torch.from_numpy(np.stack(pending))


def header_of(micro_batch: torch.Tensor) -> torch.Tensor:
    """The int64 [b, META] header of one packed micro-batch [b, width]."""
    return micro_batch[:, : 2 * META].reshape(-1).view(torch.int64).view(-1, META)


def unpack(micro_batch: torch.Tensor, header: torch.Tensor) -> dict:
    """The collated dict (only the samples that were read) of one packed micro-batch."""
    keep = header[:, 1] >= 0
    if not bool(keep.all()):  # index_select: boolean-mask indexing is ~1000x slower here
        rows = keep.nonzero().squeeze(1)
        micro_batch, kept = micro_batch.index_select(0, rows), header.index_select(0, rows)
    else:
        kept = header
    tokens = micro_batch[:, 2 * META:]
    return {"input_ids": tokens[:, :-1].long(), "targets": tokens[:, 1:].long(),
            "index": kept[:, 0], "set_id": kept[:, 1], "sample_id": kept[:, 2],
            "lost_samples": header[:, 3].sum().reshape(1), "bad_shards": header[:, 4].sum().reshape(1)}
