"""`StreamLoader`: a DataLoader over a `MixtureStream` that knows the global resume point and the error counts.

Each batch it yields is one micro-batch of this rank (the dict of `MixtureStream`, collated: `input_ids` and
`targets` LongTensor[b, seq_len], `index`, `set_id`, `sample_id`, `lost_samples`, `bad_shards` LongTensor[b]),
so after n batches the job has consumed `start + n * micro_batch_size * world_size` global samples.
`state_dict()` returns that one number (Lightning saves dataloader state from rank 0 only, and this state is
global, so rank 0's copy resumes every rank); `load_state_dict()` sets it before the next `iter()`. Workers are
never persistent: each `iter()` starts them from the current counter, so an interrupted iteration (prefetched
batches thrown away) repeats nothing. Workers send one packed tensor per batch (`MixtureStream.iter_packed`).
"""
from __future__ import annotations

from collections.abc import Mapping

from torch.utils.data import DataLoader, IterableDataset

from .stream import MixtureStream, unpack_batch


class _Packed(IterableDataset):
    def __init__(self, stream: MixtureStream):
        self.stream = stream

    def __iter__(self):
        return self.stream.iter_packed()


class StreamLoader(DataLoader):
    def __init__(self, stream: MixtureStream, *, pin_memory: bool = False, prefetch_factor: int | None = None,
                 multiprocessing_context=None):
        kwargs = {}
        if stream.num_workers > 0:
            kwargs["prefetch_factor"] = prefetch_factor or 4
            kwargs["multiprocessing_context"] = multiprocessing_context
        super().__init__(_Packed(stream), batch_size=None, num_workers=stream.num_workers, pin_memory=pin_memory,
                         persistent_workers=False, **kwargs)
        self.stream = stream
        self.stats = {"consumed_samples": stream.consumed_samples, "lost_samples": 0, "bad_shards": 0}

    @property
    def consumed_samples(self) -> int:
        return self.stream.consumed_samples

    def __iter__(self):
        step = self.stream.micro_batch_size * self.stream.world_size
        for packed in super().__iter__():
            batch = unpack_batch(packed)
            self.stream.consumed_samples += step
            self.stats["consumed_samples"] = self.stream.consumed_samples
            self.stats["lost_samples"] += int(batch["lost_samples"].sum())
            self.stats["bad_shards"] += int(batch["bad_shards"].sum())
            yield batch

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: Mapping) -> None:
        self.stream.load_state_dict(state)
        self.stats["consumed_samples"] = self.stream.consumed_samples
