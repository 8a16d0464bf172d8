"""Moving micro-batches from DataLoader workers to the training process cheaply, in order.

torch sends every tensor a worker yields through a fresh shared-memory segment, copying it there, and the
training process then faults in every page of it: on a 2-core host that cost more than reading the shards. So:

- A worker packs up to `group` of its micro-batches (about 2 MB, less with many workers so that the whole ring
  stays within `StreamLoader.RING_BYTES`; the first groups of an iteration are 1, 2, 4, ... micro-batches so the
  first batch comes quickly) into one byte block [group, b, width]. Per row: five int64
  header fields (global index, set_id or LOST / PADDING, sample_id, unused, bad_shards), then the sample's
  stored row (seq_len + 1 tokens; a chat set's row also holds one flag per token) in the shards' own integer type
  (uint16 up to 65536 tokens: a quarter of int64's bytes), padded to a multiple of 8 bytes.
- With workers the blocks live in a ring [workers, slots, group, b, width] that `StreamLoader` creates in shared
  memory once per iteration; a worker writes group n into slot n % slots and yields only (worker, slot, count).
  The ring is safe because the DataLoader keeps at most prefetch_factor * num_workers items outstanding and the
  training process copies a group out before it asks for the next one (slots = that bound + 1).
- The training process reads the headers as numpy, puts micro-batches back into rank order by their ordinal,
  drops lost and padding rows, and widens the group's tokens to int32 in one numpy copy (single-threaded on
  purpose: torch's intra-op threads spin on a small copy and take the CPU the workers need). `input_ids` and
  `targets` are two views ([:, :-1] and [:, 1:]) of one micro-batch's rows; with `pin` (for a GPU) they are two
  contiguous pinned tensors instead, so that their copies to the device are asynchronous. Chat rows become the
  model's fields (masked targets, positions, segments; `chat.model_fields`) in the same numpy pass over the group.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import get_worker_info

from .chat import model_fields

META = 5
HEADER_BYTES = 8 * META
LOST, PADDING = -1, -2


def row_width(values: int, token_dtype: np.dtype) -> int:
    """Bytes of one row of the ring: the header, then `values` integers of the sample (seq_len + 1 tokens)."""
    return -(-(HEADER_BYTES + values * np.dtype(token_dtype).itemsize) // 8) * 8


def group_size(micro_batch_size: int, values: int, token_dtype: np.dtype, target_bytes: int = 2 << 20,
               most: int = 256) -> int:
    """Micro-batches per transfer: about `target_bytes` each (a transfer has a fixed cost; bigger ones
    also delay the first batch and hold more memory in flight)."""
    return max(1, min(most, target_bytes // (micro_batch_size * row_width(values, token_dtype))))


def shared_ring(workers: int, slots: int, group: int, micro_batch_size: int, width: int) -> torch.Tensor:
    """The byte buffers workers write their groups into: [workers, slots, group, b, width] in shared memory,
    created once per iteration, so each page is faulted in once rather than once per transfer."""
    shape = (workers, slots, group, micro_batch_size, width)
    storage = torch.UntypedStorage._new_shared(int(np.prod(shape)))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


def iter_groups(stream, group: int, ring: torch.Tensor | None = None):
    """`group` micro-batches at a time packed into one byte tensor (the last group may be shorter).

    Without `ring` (no workers) it yields the tensors. In worker w it writes group n into `ring[w, n % slots]` and
    yields only (w, slot, micro-batches): safe because the DataLoader has at most prefetch_factor * num_workers
    items outstanding and `StreamLoader` copies a group out before asking for the next (slots = that + 1)."""
    b, values, dtype = stream.micro_batch_size, stream.sample_width, np.dtype(stream.token_dtype)
    width = row_width(values, dtype)
    worker = get_worker_info().id if ring is not None else 0
    for n, (reader, parts) in enumerate(stream.chunks(group)):
        if ring is None:
            buffer = torch.empty((len(parts), b, width), dtype=torch.uint8)
        else:
            slot = n % ring.shape[1]
            buffer = ring[worker, slot, :len(parts)]
        view = buffer.numpy().reshape(len(parts) * b, width)
        headers = view[:, :HEADER_BYTES].view(np.int64)  # [rows, META]
        tokens = view[:, HEADER_BYTES:HEADER_BYTES + values * dtype.itemsize].view(dtype)
        headers[:] = 0
        headers[:, 1] = PADDING
        index = np.concatenate(parts)
        if all(len(part) == b for part in parts):
            dest = np.arange(len(index))
        else:
            dest = np.concatenate([m * b + np.arange(len(part)) for m, part in enumerate(parts)])
        set_ids, sample_ids = reader.read(index, tokens, dest)
        headers[dest, 0] = index
        headers[dest, 1] = np.where(sample_ids >= 0, set_ids, LOST)
        headers[dest, 2] = sample_ids
        headers[0, 4] = reader.take_counters()[1]  # lost samples are the micro-batches' own LOST rows
        yield buffer if ring is None else (worker, slot, len(parts))


def padding_group(ordinals: range, micro_batch_size: int, width: int, first: int, world_size: int) -> torch.Tensor:
    """A packed group of empty micro-batches (every row PADDING) at these ordinals of this rank, for `unpack_group`:
    each micro-batch's first row carries the global index its ordinal starts at, which is all unpack_group reads
    of a row it drops."""
    b = micro_batch_size
    buffer = torch.zeros((len(ordinals), b, width), dtype=torch.uint8)
    headers = buffer.numpy()[:, :, :HEADER_BYTES].view(np.int64)  # [g, b, META]
    headers[:, :, 1] = PADDING
    headers[:, 0, 0] = first + np.asarray(ordinals, dtype=np.int64) * b * world_size
    return buffer


def unpack_group(packed: torch.Tensor, seq_len: int, token_dtype: np.dtype, first: int, world_size: int,
                 pin: bool = False, chat: str | None = None) -> list[tuple[int, dict]]:
    """Per micro-batch of a packed group: (ordinal on this rank, the collated dict of the samples that were read,
    with the lost samples and bad shards met while reading it). `first` is this rank's first global index of
    the iteration. `chat`: None for token rows, 'packed' or 'padded' for chat rows (see `MixtureStream.chat`),
    whose micro-batches also carry `chat_tokens` [2] (non-padding inputs, targets).

    One conversion widens all the group's tokens (to int32: nn.Embedding takes it as is, the loss widens the
    targets it needs), into pinned memory when `pin`; every tensor of a micro-batch is a view of one per-group
    tensor, and none is a view of `packed` (a ring slot the worker will write again)."""
    g, b, _ = packed.shape
    headers = packed.numpy()[:, :, :HEADER_BYTES].view(np.int64)  # [g, b, META]
    ordinals = (headers[:, 0, 0] - first) // world_size // b
    # [g, 2]: lost samples (each micro-batch's own LOST rows: counted on the step they belong to, and a resumed run
    # counts none of an earlier process's), bad shards (the reads that failed while reading the micro-batch).
    counters = np.stack([(headers[:, :, 1] == LOST).sum(axis=1), headers[:, :, 4].sum(axis=1)], axis=1)
    # A copy, always: for g * b == 1 numpy would call the transposed view contiguous and hand back the ring itself.
    fields = torch.from_numpy(np.array(headers[:, :, :3].transpose(2, 0, 1), copy=True))  # [3, g, b]
    small = torch.from_numpy(counters)
    values = (seq_len + 1) * (1 if chat is None else 2)
    nbytes = values * np.dtype(token_dtype).itemsize
    # numpy, single-threaded: torch's intra-op threads would spin on this small copy and take the CPU the
    # workers need (measured: twice the main process's CPU time on 2 cores).
    stored = packed.numpy()[:, :, HEADER_BYTES:HEADER_BYTES + nbytes].view(token_dtype)
    if chat is None and pin:
        # For the GPU: inputs and targets each contiguous in pinned memory (two widening copies), so that the
        # non-blocking host-to-device copies are asynchronous DMA — a strided view would first be gathered into a
        # pageable temporary and copied from there.
        pair = torch.empty((2, g, b, seq_len), dtype=torch.int32, pin_memory=True)
        np.copyto(pair[0].numpy(), stored[:, :, :-1], casting="unsafe")
        np.copyto(pair[1].numpy(), stored[:, :, 1:], casting="unsafe")
        per_row = {"input_ids": pair[0], "targets": pair[1]}
    else:
        wide = torch.empty((g, b, values), dtype=torch.int32)
        np.copyto(wide.numpy(), stored, casting="unsafe")
        if chat is None:
            per_row = {"input_ids": wide[:, :, :-1], "targets": wide[:, :, 1:]}
        else:
            per_row = {k: torch.from_numpy(v) for k, v in model_fields(wide.numpy(), seq_len,
                                                                        chat == "packed").items()}
            if pin:
                per_row = {k: v.pin_memory() for k, v in per_row.items()}
    per_row.update(index=fields[0], set_id=fields[1], sample_id=fields[2])
    names = list(per_row)
    columns = zip(*(per_row[k].unbind(0) for k in names), small[:, 0:1].unbind(0), small[:, 1:2].unbind(0))
    keep = headers[:, :, 1] >= 0
    kept_all = keep.all(axis=1).tolist()
    out = []
    for m, (ordinal, cols) in enumerate(zip(ordinals.tolist(), columns)):
        batch = dict(zip((*names, "lost_samples", "bad_shards"), cols))
        if not kept_all[m]:
            rows = torch.from_numpy(np.flatnonzero(keep[m]))
            for key in names:
                batch[key] = batch[key].index_select(0, rows)
        if chat is not None:
            batch["chat_tokens"] = batch["chat_tokens"].sum(0)
        out.append((ordinal, batch))
    return out
