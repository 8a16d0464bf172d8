"""`StreamLoader`: the DataLoader to train from a `MixtureStream`; it knows the global resume point.

Each batch it yields is one micro-batch of this rank: `input_ids` and `targets` IntTensor[n, seq_len] (int32: two
views of one [n, seq_len + 1] tensor, or two contiguous pinned tensors with `pin_memory`; targets are the next
tokens; `nn.Embedding` takes int32 indices, and the model's loss widens its targets), `index`, `set_id`, `sample_id`
LongTensor[n], and `lost_samples`, `bad_shards` LongTensor[1] (this batch's samples lost to bad data; the shard reads
that failed while its worker read it); from chat sets also `position_ids` and `segment_ids` IntTensor[n, seq_len] (packed sets), masked `targets`
and `chat_tokens` LongTensor[2] (non-padding inputs, targets). n is `micro_batch_size` except where samples were
lost to bad data (then smaller, possibly 0: every micro-batch of the data order is yielded, so the other samples
keep their places and a consumer that counts micro-batches knows the position). A bounded stream (`stop_samples`,
the validation set) yields the same number of micro-batches on every rank (`MixtureStream.micro_batches_per_rank`):
a rank whose share is shorter ends with empty ones, so that a model-sharded forward (FSDP2 all-gathers in each)
never waits for a rank that has stopped.

How it is fast (see packing.py): workers write groups of micro-batches straight into a ring of shared-memory
buffers created once per iteration and send only (worker, slot, count); tokens travel in the shards' own integer
type and are widened once per group (into pinned memory when `pin_memory` is set and CUDA is there); local
shards are memory-mapped (`remote.map_or_read`), not copied.

The data position is not the loader's: after n micro-batches of every rank the job has consumed
`stream.consumed_samples + n * micro_batch_size * world_size` global samples, whatever the data errors; the
trainer counts that (app/module.py) and builds the next loader from it. Workers are never persistent: each
`iter()` starts them from the stream's start, so an interrupted iteration (prefetched batches thrown away) repeats
nothing.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, IterableDataset

from .packing import group_size, iter_groups, padding_group, row_width, shared_ring, unpack_group
from .stream import MixtureStream


class _Groups(IterableDataset):
    def __init__(self, stream: MixtureStream, group: int):
        self.stream, self.group = stream, group
        self.ring: torch.Tensor | None = None  # set by StreamLoader before the workers start

    def __iter__(self):
        return iter_groups(self.stream, self.group, self.ring)


class StreamLoader(DataLoader):
    """`group`: micro-batches a worker sends at once (default: about 2 MB of tokens, less with many workers so that
    the ring stays within `RING_BYTES`; see packing.py). `pin_memory`: batches are widened straight into pinned
    memory (the DataLoader's own pinning thread would only see the ring's slot numbers)."""

    RING_BYTES = 64 << 20

    def __init__(self, stream: MixtureStream, *, group: int | None = None, pin_memory: bool = False,
                 prefetch_factor: int | None = None, multiprocessing_context=None):
        kwargs = {}
        if stream.num_workers > 0:
            kwargs["prefetch_factor"] = prefetch_factor or 2
            kwargs["multiprocessing_context"] = multiprocessing_context
        # Ring slots per worker (see packing.py): the DataLoader's bound on outstanding items, plus one.
        self.slots = kwargs["prefetch_factor"] * stream.num_workers + 1 if stream.num_workers else 0
        if group is None:
            ring_slots = stream.num_workers * self.slots
            target = min(2 << 20, self.RING_BYTES // ring_slots) if ring_slots else 2 << 20
            group = group_size(stream.micro_batch_size, stream.sample_width, stream.token_dtype, target_bytes=target)
        if not isinstance(group, int) or group < 1:
            raise ValueError(f"group={group!r} must be a positive integer (or None for about 2 MB per transfer)")
        super().__init__(_Groups(stream, group), batch_size=None, num_workers=stream.num_workers,
                         pin_memory=False, persistent_workers=False, **kwargs)
        self.stream, self.group = stream, group
        self.pin = bool(pin_memory) and torch.cuda.is_available()

    def __iter__(self):
        stream = self.stream
        W, b = stream.world_size, stream.micro_batch_size
        start = stream.consumed_samples
        first = start + (stream.rank - start) % W  # this rank's first global index
        pending, next_ordinal = {}, 0
        ring = None
        if self.num_workers > 0:
            ring = shared_ring(self.num_workers, self.slots, self.group, b,
                               row_width(stream.sample_width, stream.token_dtype))
        self.dataset.ring = ring
        try:
            for item in super().__iter__():
                group = item if ring is None else ring[item[0], item[1], :item[2]]
                for ordinal, batch in unpack_group(group, stream.seq_len, stream.token_dtype, first, W, pin=self.pin,
                                                   chat=stream.chat):
                    pending[ordinal] = batch
                while next_ordinal in pending:
                    yield pending.pop(next_ordinal)
                    next_ordinal += 1
            total = stream.micro_batches_per_rank()
            if total is not None and next_ordinal < total:  # this rank's share ended early: pad (see the stream)
                padding = padding_group(range(next_ordinal, total), b, row_width(stream.sample_width,
                                                                                 stream.token_dtype), first, W)
                for _, batch in unpack_group(padding, stream.seq_len, stream.token_dtype, first, W, chat=stream.chat):
                    yield batch
        finally:
            self.dataset.ring = None  # the workers hold their own references until they exit
