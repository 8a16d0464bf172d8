"""`StreamLoader`: the DataLoader to train from a `MixtureStream`; it knows the global resume point.

Each batch it yields is one micro-batch of this rank: `input_ids` and `targets` LongTensor[n, seq_len] (targets are
the next tokens), `index`, `set_id`, `sample_id` LongTensor[n], and `lost_samples`, `bad_shards` LongTensor[1]
(data errors behind this batch; their running sums are in `stats`), and `consumed_samples` LongTensor[1]: the
job's global count once this micro-batch has been trained on, the number to checkpoint. n is `micro_batch_size`
except where samples were lost to bad data (then smaller; the other samples keep their places).

After n micro-batches the job has consumed `start + n * micro_batch_size * world_size` global samples, whatever the
data errors. `state_dict()` returns that one number (Lightning saves dataloader state from rank 0 only; this
state is global, so rank 0's copy resumes every rank); `load_state_dict()` sets it before the next `iter()`.
Workers are never persistent: each `iter()` starts them from the current counter, so an interrupted iteration
(prefetched batches thrown away) repeats nothing.

Inside a Lightning fit, `state_dict()` runs ahead of training by the batches Lightning has fetched but not trained
on (its fetcher prefetches one batch when the loader has no length). For an exact resume, checkpoint
`batch["consumed_samples"]` of the last batch the optimizer stepped on and pass it back with
`load_state_dict({"consumed_samples": n})` (or `MixtureStream(consumed_samples=n)`).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.utils.data import DataLoader, IterableDataset

from .packing import header_of, iter_groups, unpack
from .stream import MixtureStream


class _Groups(IterableDataset):
    def __init__(self, stream: MixtureStream, group: int):
        self.stream, self.group = stream, group

    def __iter__(self):
        return iter_groups(self.stream, self.group)


class StreamLoader(DataLoader):
    """`group`: micro-batches a worker sends at once (fewer, larger transfers; see packing.py)."""

    def __init__(self, stream: MixtureStream, *, group: int = 8, pin_memory: bool = False,
                 prefetch_factor: int | None = None, multiprocessing_context=None):
        if not isinstance(group, int) or group < 1:
            raise ValueError(f"group={group!r} must be a positive integer")
        kwargs = {}
        if stream.num_workers > 0:
            kwargs["prefetch_factor"] = prefetch_factor or 2
            kwargs["multiprocessing_context"] = multiprocessing_context
        super().__init__(_Groups(stream, group), batch_size=None, num_workers=stream.num_workers,
                         pin_memory=pin_memory, persistent_workers=False, **kwargs)
        self.stream = stream
        self.stats = {"consumed_samples": stream.consumed_samples, "lost_samples": 0, "bad_shards": 0}

    @property
    def consumed_samples(self) -> int:
        return self.stream.consumed_samples

    def __iter__(self):
        stream = self.stream
        W, b = stream.world_size, stream.micro_batch_size
        start = stream.consumed_samples
        first = start + (stream.rank - start) % W  # this rank's first global index
        pending, next_ordinal = {}, 0
        for group in super().__iter__():
            for micro_batch in group:
                header = header_of(micro_batch)
                pending[(int(header[0, 0]) - first) // W // b] = (micro_batch, header)
            while next_ordinal in pending:
                micro_batch, header = pending.pop(next_ordinal)
                next_ordinal += 1
                batch = unpack(micro_batch, header)
                stream.consumed_samples = start + next_ordinal * b * W
                batch["consumed_samples"] = torch.tensor([stream.consumed_samples])
                self.stats["consumed_samples"] = stream.consumed_samples
                self.stats["lost_samples"] += int(batch["lost_samples"])
                self.stats["bad_shards"] += int(batch["bad_shards"])
                if len(batch["index"]):
                    yield batch

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: Mapping) -> None:
        self.stream.load_state_dict(state)
        self.stats["consumed_samples"] = self.stream.consumed_samples
