"""`MixtureStream`: the exactly resumable, mixture-scheduled stream over webdataset shard sets.

What a rank reads. Global sample i goes to rank i mod W (W = world_size); on a rank, the DataLoader takes
micro-batches of b samples from its K workers in turn, so rank-local sample j goes to worker (j div b) mod K.
After every rank has consumed n micro-batches, the union over ranks is exactly the global samples
[C0, C0 + n*b*W), whatever the layout: that is why one global number, `consumed_samples`, resumes the job on
any world size and any worker count (each rank starts at the first index >= C that is congruent to its rank).

Which shards a worker reads. Sample i comes from virtual stream i mod V (`sequence.py`). When V is a multiple of
W*K*b, each virtual stream belongs to exactly one (rank, worker), so a worker reads only its own streams' shards
(no rank reads every shard). That is the layout constraint, checked at construction:
`num_streams % (world_size * max(1, num_workers) * micro_batch_size) == 0` (unless a single process reads all).
Correctness does not depend on it (a shared stream is just read by several workers); I/O locality does.

Chat sets (`kind: chat` manifests, components/data/chat.py) carry per-token segments and the loss mask in each
row; an item then also has `position_ids` and `segment_ids` (packed sets) and `targets` hold IGNORE_INDEX where
a token is not a target. A chat set is read in exact epochs (`sequence.EpochLayout`): with it alone in the
mixture, global samples [e * N, (e + 1) * N) are epoch e, every sample once, in an order that is a pure function
of (seed, set, e). Chat and token sets are not mixed in one stream.

A yielded item is a dict: `input_ids` LongTensor[seq_len], `targets` LongTensor[seq_len] (the next tokens),
`index` (global sample index), `set_id` (position of the set in `set_names`), `sample_id` (the sample's position in
its set's packed token stream), `lost_samples` and `bad_shards` (data errors met since the previous item of this
worker; `StreamLoader` hands them on with each micro-batch). `StreamLoader` is the way to train from it: it batches in the
workers, hands groups of micro-batches over through a shared-memory ring, and yields the same dicts collated.

Bad data: a truncated or corrupt tar, a malformed sample or a shard that went missing is logged once, its samples
are skipped and counted, and the stream goes on. Through `StreamLoader` a lost sample only makes its micro-batch
smaller (every other sample keeps its place, so resume stays exact); iterating the per-sample `__iter__` with a
plain DataLoader instead shifts that worker's later samples by one per hole. At construction, a missing manifest, a missing
shard file or a tokenizer fingerprint that does not match is a ValueError.
"""
from __future__ import annotations

import errno
import itertools
import logging
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from . import remote
from .chat import model_fields
from .sequence import EpochLayout, MixturePlan, SetLayout, count_draws
from .shards import read_manifest
from .tarshard import SAMPLE_EXT, ShardSamples, decode_shard

log = logging.getLogger(__name__)
# Out of file descriptors or memory: not bad data, so never counted as a lost shard.
_RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM}


@dataclass
class ShardSet:
    """A shard set as the stream sees it: its manifest and the full location of every shard."""

    name: str
    location: str
    manifest: dict
    urls: list[str]

    @property
    def shard_samples(self) -> list[int]:
        return [int(s["samples"]) for s in self.manifest["shards"]]


def open_shard_set(name: str, location: str, tokenizer_fingerprint: str | None = None,
                   check_shards: bool = True) -> ShardSet:
    """Read and check a shard set's manifest: ValueError before training if anything is off."""
    manifest = read_manifest(location)
    fingerprint = manifest.get("tokenizer", {}).get("fingerprint")
    if tokenizer_fingerprint is not None and fingerprint != tokenizer_fingerprint:
        raise ValueError(f"shard set {name!r} at {location!r} was built with tokenizer fingerprint "
                         f"{str(fingerprint)[:16]}..., but the configured tokenizer has {tokenizer_fingerprint[:16]}...; "
                         "rebuild the shards or configure the tokenizer they were built with")
    urls = [remote.join(location, s["file"]) for s in manifest["shards"]]
    if check_shards:
        to_check = urls if not remote.is_url(location) else urls[:1]  # remote: one request, not thousands
        missing = [u for u in to_check if not remote.exists(u)]
        if missing:
            raise ValueError(f"shard set {name!r}: {len(missing)} shard file(s) listed in the manifest do not exist, "
                             f"e.g. {missing[0]!r}")
    return ShardSet(name, location, manifest, urls)


def check_stream_layout(num_streams: int, world_size: int, num_workers: int, micro_batch_size: int) -> None:
    """The data order's layout rule: with more than one reader, the V virtual streams must split evenly over
    ranks × workers × micro-batch, so that every stream has exactly one owner (exact resume on any layout)."""
    period = world_size * max(1, num_workers) * micro_batch_size
    if num_streams % period and world_size * max(1, num_workers) > 1:  # one reader owns all: no constraint
        raise ValueError(
            f"num_streams={num_streams} must be a multiple of world_size*max(1,num_workers)*micro_batch_size"
            f" = {world_size}*{max(1, num_workers)}*{micro_batch_size} = {period}, so that every virtual stream"
            " has one owner; choose num_streams as a multiple of every layout the job may resume on")


def data_order(sets: Mapping[str, str], mixture, *, seq_len: int, num_streams: int, seed: int,
               consumed_samples: int) -> dict:
    """What decides which sample sits at each of the global indices [0, consumed_samples): the virtual streams,
    the seed, the mixture of those samples and the shard layout of every set they draw from. A resume continues
    exactly (nothing repeated or skipped) only when this is equal for the checkpoint and the configuration."""
    plan = MixturePlan.from_mixture(list(sets), mixture, seq_len)
    prefix = plan.prefix(consumed_samples)
    used = sorted({name for _, _, weights in prefix for name, _ in weights})
    return {"num_streams": num_streams, "seed": seed, "mixture": prefix,
            "shard_samples": {name: [int(s["samples"]) for s in read_manifest(sets[name])["shards"]] for name in used}}


def data_order_changes(saved: dict, now: dict) -> list[str]:
    """One 'what: checkpoint -> configuration' per difference of two `data_order` results."""
    changes = [f"data.{key}: {saved.get(key)!r} -> {now.get(key)!r}" for key in ("num_streams", "seed")
               if saved.get(key) != now.get(key)]
    if saved.get("mixture") != now.get("mixture"):
        changes.append(f"the mixture of the consumed samples ([first, end, [[set, weight]]] per stage): "
                       f"{saved.get('mixture')} -> {now.get('mixture')}")
    before, after = saved.get("shard_samples", {}), now.get("shard_samples", {})
    for name in sorted(set(before) & set(after)):
        if before[name] != after[name]:
            changes.append(f"shard set {name!r}: {len(before[name])} shards of {sum(before[name])} samples -> "
                           f"{len(after[name])} shards of {sum(after[name])} samples")
    return changes


class MixtureStream(IterableDataset):
    """Infinite (or `stop_samples`-bounded) stream of packed samples from several shard sets.

    sets: {name: location} (local directory or URL prefix holding `manifest.json` and the shards).
    mixture: a constant {name: weight} or a `StageSchedule` (per-sample mixture by token position).
    rank, world_size: this process's data-parallel rank, given explicitly (never read from torch.distributed).
    num_workers: the DataLoader's worker count (0 = load in the main process); checked against the real one.
    micro_batch_size: the DataLoader's batch_size (per rank); the global batch may still change per stage
      through gradient accumulation.
    num_streams: V, the number of virtual streams; part of the data order, keep it fixed for a whole job. The
      default 1536 = 2**9 * 3 fits every layout whose world_size * workers * micro_batch_size divides it (e.g.
      1-3 ranks x 1-4 workers x 8 or 16 sequences); for a large job pick V as a multiple of every layout it may
      run on (e.g. 3 * 2**13 for up to 512 ranks x 4 workers x 4 sequences). Each set needs >= V samples for a
      worker to read only its own shards (otherwise streams share shards, which is correct but reads more).
    consumed_samples: global samples the job consumed before this stream starts (the resume point; the trainer
      owns the running count, the stream only starts there).
    """

    def __init__(self, sets: Mapping[str, str], mixture, *, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, micro_batch_size: int = 1, num_streams: int = 1536, seed: int = 0,
                 consumed_samples: int = 0, stop_samples: int | None = None,
                 tokenizer_fingerprint: str | None = None, check_shards: bool = True, cache_shards: int = 4):
        super().__init__()
        checks = (("world_size", world_size, 1), ("rank", rank, 0), ("num_workers", num_workers, 0),
                  ("micro_batch_size", micro_batch_size, 1), ("num_streams", num_streams, 1),
                  ("consumed_samples", consumed_samples, 0))
        for field, value, low in checks:
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{field}={value!r} must be an integer >= {low}")
        if rank >= world_size:
            raise ValueError(f"rank={rank} must be < world_size={world_size}")
        check_stream_layout(num_streams, world_size, num_workers, micro_batch_size)
        if not isinstance(sets, Mapping) or not sets:
            raise ValueError(f"sets={sets!r} must be a non-empty mapping {{name: location}} of shard sets")
        if stop_samples is not None and (not isinstance(stop_samples, int) or stop_samples < 0):
            raise ValueError(f"stop_samples={stop_samples!r} must be None (endless) or an integer >= 0")
        if not isinstance(cache_shards, int) or cache_shards < 0:
            raise ValueError(f"cache_shards={cache_shards!r} must be an integer >= 0")
        self.sets = [open_shard_set(n, str(loc), tokenizer_fingerprint, check_shards) for n, loc in sets.items()]
        self.set_names = [s.name for s in self.sets]
        seq_lens = {s.name: int(s.manifest["seq_len"]) for s in self.sets}
        if len(set(seq_lens.values())) != 1:
            raise ValueError(f"shard sets have different seq_len: {seq_lens}")
        self.seq_len = next(iter(seq_lens.values()))
        kinds = {s.name: s.manifest.get("kind", "tokens") for s in self.sets}
        if len(set(kinds.values())) != 1:
            raise ValueError(f"shard sets mix kinds {kinds}: chat sets and token sets cannot share a stream")
        self.sample_width = int(self.sets[0].manifest["sample_tokens"])  # integers per stored row
        # None for token sets; 'packed' (segments, positions) or 'padded' (one conversation per row) for chat sets.
        self.chat = None if kinds[self.set_names[0]] != "chat" else (
            "padded" if all(s.manifest["chat"]["packing"] == "none" for s in self.sets) else "packed")
        self.token_dtype = np.result_type(*(np.dtype(s.manifest["dtype"]) for s in self.sets))
        self.plan = MixturePlan.from_mixture(self.set_names, mixture, self.seq_len)
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.micro_batch_size, self.num_streams, self.seed = micro_batch_size, num_streams, seed
        self.consumed_samples, self.stop_samples = consumed_samples, stop_samples
        self.cache_shards = cache_shards

    # -- iteration ------------------------------------------------------------------------------------------
    def worker_indices(self, worker: int, num_workers: int, sizes, start: int | None = None):
        """Global sample indices this (rank, worker) yields, in order: lists of micro-batch arrays, `sizes`
        micro-batches at a time (an iterable of counts), computed together."""
        W, b, K = self.world_size, self.micro_batch_size, max(1, num_workers)
        start = self.consumed_samples if start is None else start
        first = start + (self.rank - start) % W  # first global index >= start on this rank
        m = 0
        for size in sizes:
            j = ((m + np.arange(size, dtype=np.int64)) * K + worker)[:, None] * b + np.arange(b, dtype=np.int64)
            index = first + j * W  # [size, b]
            m += size
            if self.stop_samples is None or index[-1, -1] < self.stop_samples:
                yield list(index)
                continue
            parts = [row[row < self.stop_samples] for row in index]
            parts = [part for part in parts if part.size]
            if parts:
                yield parts
            return

    def micro_batches_per_rank(self) -> int | None:
        """How many micro-batches every rank's loader yields from `consumed_samples` to `stop_samples` (None when
        endless): the most any rank has, i.e. the rank holding the first global index. A rank with fewer samples
        (stop_samples not a multiple of world_size × micro_batch_size) ends with empty micro-batches
        (`StreamLoader`), so every rank runs the same number of forward passes — under FSDP2 each forward
        all-gathers parameters, and a rank that stopped one batch early would leave the others waiting forever."""
        if self.stop_samples is None:
            return None
        samples = max(0, -(-(self.stop_samples - self.consumed_samples) // self.world_size))
        return -(-samples // self.micro_batch_size)

    def chunks(self, group: int = 1):
        """(reader, [global indices of each micro-batch]) for up to `group` micro-batches of this (rank, worker)
        at a time: they are located and read together (fewer, larger numpy calls; same result). Must run in the
        DataLoader worker (or the main process if none); read the samples with `reader.read`. The first chunks
        hold 1, 2, 4, ... micro-batches, so the first batch does not wait for a whole group."""
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 0)
        if num_workers != self.num_workers:
            raise ValueError(f"MixtureStream was built for num_workers={self.num_workers} but the DataLoader runs "
                             f"{num_workers}; pass the same number to both")
        reader = _WorkerReader(self)
        ramp = itertools.chain((min(group, 1 << i) for i in range(max(1, group).bit_length())),
                               itertools.repeat(group))
        for chunk in self.worker_indices(worker, num_workers, ramp):
            yield reader, chunk

    def __iter__(self):
        """One dict per sample (see the module docstring); collate with DataLoader(batch_size=micro_batch_size)."""
        for reader, (index,) in self.chunks():
            tokens = np.empty((len(index), self.sample_width), dtype=self.token_dtype)
            set_ids, sample_ids = reader.read(index, tokens, np.arange(len(index)))
            for r in np.flatnonzero(sample_ids >= 0).tolist():
                if self.chat is None:
                    row = torch.from_numpy(tokens[r].astype(np.int64))
                    fields = {"input_ids": row[:-1], "targets": row[1:]}
                else:
                    fields = {k: torch.from_numpy(v.astype(np.int64)) for k, v in
                              model_fields(tokens[r], self.seq_len, self.chat == "packed").items()}
                lost, bad = reader.take_counters()
                yield {**fields, "index": int(index[r]), "set_id": int(set_ids[r]),
                       "sample_id": int(sample_ids[r]), "lost_samples": lost, "bad_shards": bad}


def _code(set_id, shard_index):
    """One integer for a (set, shard) pair (scalars or arrays)."""
    return set_id * (1 << 32) + shard_index


def _uncode(code: int) -> tuple[int, int]:
    return code >> 32, code & 0xFFFFFFFF


class _WorkerReader:
    """The per-worker state: virtual-stream cursors, set layouts and decoded shards."""

    def __init__(self, stream: MixtureStream):
        self.stream = stream
        self.layouts = [(EpochLayout if stream.chat else SetLayout)(s.name, s.shard_samples, stream.num_streams,
                                                                    stream.seed) for s in stream.sets]
        n_sets, V = len(self.layouts), stream.num_streams
        self.position = np.zeros(V, dtype=np.int64)        # next position of each virtual stream
        self.draws = np.zeros((V, n_sets), dtype=np.int64)  # draws so far of each virtual stream from each set
        self.current = np.full((V, n_sets), -1, dtype=np.int64)  # (stream, set) -> shard index being read
        self.held: dict[int, ShardSamples] = {}  # the shards some stream is still reading, by _code(set, shard)
        self.live: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self.recent: OrderedDict = OrderedDict()
        self.lost = self.bad_shards = 0

    def shard(self, set_id: int, shard_index: int) -> ShardSamples:
        key = (set_id, shard_index)
        found = self.held.get(_code(set_id, shard_index))
        if found is not None:  # a stream is inside it: alive anyway, no need to refresh the recency list
            return found
        found = self.live.get(key)
        if found is None:
            found = self._load(set_id, shard_index)
            self.live[key] = found
        self.recent[key] = found
        self.recent.move_to_end(key)
        while len(self.recent) > self.stream.cache_shards:
            self.recent.popitem(last=False)
        return found

    def _load(self, set_id: int, shard_index: int) -> ShardSamples:
        shard_set = self.stream.sets[set_id]
        url, entry = shard_set.urls[shard_index], shard_set.manifest["shards"][shard_index]
        data, error = None, None
        for _attempt in range(2 if remote.is_url(url) else 1):
            try:
                data = remote.map_or_read(url)
                break
            except OSError as err:  # missing file, network error: counted below, never raised
                if err.errno in _RESOURCE_ERRORS or isinstance(err, PermissionError):
                    raise  # this process (or its credentials), not the data, is in trouble: do not drop data
                error = f"{type(err).__name__}: {err}"
        shard = decode_shard(data, int(entry["samples"]), int(shard_set.manifest["sample_tokens"]),
                             shard_set.manifest["dtype"], error, ext=shard_set.manifest.get("sample_ext", SAMPLE_EXT))
        if shard.error is not None or shard.bad:
            self.bad_shards += 1
            log.warning("shard %s: %s; %d of %d samples lost", url, shard.error or "malformed samples",
                        int(entry["samples"]) - shard.valid, int(entry["samples"]))
        return shard

    def read(self, index: np.ndarray, out: np.ndarray, dest: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Read global samples `index` (increasing; may hold several positions of one virtual stream, e.g.
        several micro-batches at once) into rows `dest` of `out` [rows, sample_width]. Returns (set_id,
        sample_id) per sample; sample_id is -1 where the sample was lost to bad data (its row is left as is).
        Draw k of a sample is its stream's draws so far from its set plus the earlier samples of this call with
        the same (stream, set)."""
        choices = self.stream.plan.choose(self.stream.seed, index)
        V, n_sets = self.stream.num_streams, len(self.layouts)
        streams, positions = index % V, index // V
        order = np.lexsort((positions, streams))  # by stream, then position
        ss, ps, cs = streams[order], positions[order], choices[order]
        first = np.ones(len(ss), dtype=bool)
        first[1:] = ss[1:] != ss[:-1]
        for r in np.nonzero(first & (self.position[ss] < ps))[0].tolist():  # resume: count the skipped draws
            v = int(ss[r])
            self.draws[v] += count_draws(self.stream.plan, self.stream.seed, v, V, int(self.position[v]), int(ps[r]))
            self.position[v] = ps[r]
        previous = np.empty_like(ps)
        previous[0], previous[1:] = 0, ps[:-1] + 1
        expected = np.where(first, self.position[ss], previous)
        if not np.array_equal(ps, expected):
            raise RuntimeError("virtual stream positions must be consumed in order without gaps")
        key = ss * n_sets + cs
        by_key = np.argsort(key, kind="stable")  # stable: position order within each (stream, set)
        sorted_key = key[by_key]
        starts = np.ones(len(key), dtype=bool)
        starts[1:] = sorted_key[1:] != sorted_key[:-1]
        rank = np.arange(len(key)) - np.maximum.accumulate(np.where(starts, np.arange(len(key)), 0))
        earlier = np.empty_like(rank)
        earlier[by_key] = rank
        ks_sorted = self.draws[ss, cs] + earlier
        np.add.at(self.draws, (ss, cs), 1)
        last = np.ones(len(ss), dtype=bool)
        last[:-1] = ss[1:] != ss[:-1]
        self.position[ss[last]] = ps[last] + 1
        ks = np.empty_like(ks_sorted)
        ks[order] = ks_sorted
        shard_of = np.empty_like(ks)
        offset_of = np.empty_like(ks)
        for c in np.unique(choices).tolist():
            sel = choices == c
            _, shard_of[sel], offset_of[sel] = self.layouts[c].locate_many(streams[sel], ks[sel])
        sample_ids = np.full(len(index), -1, dtype=np.int64)
        # Consecutive samples belong to different virtual streams, hence mostly to different shards: one lookup
        # per shard, then one row copy per sample (cheaper than a numpy gather per shard for ~2 rows each).
        codes, which = np.unique(_code(choices, shard_of), return_inverse=True)
        codes = codes.tolist()
        shards = [self.shard(*_uncode(code)) for code in codes]
        ok = offset_of < np.array([shard.valid for shard in shards])[which]
        self.lost += int(len(ok) - ok.sum())
        members = np.flatnonzero(ok)
        picks = list(zip(which[members].tolist(), offset_of[members].tolist()))
        rows = [shards[j].tokens[o:o + 1] for j, o in picks]
        if rows:
            d = dest[members]
            if d[-1] - d[0] == len(d) - 1:  # consecutive destination rows (the usual case): one copying call
                np.concatenate(rows, out=out[d[0]:d[-1] + 1])
            else:
                out[d] = np.concatenate(rows)
            sample_ids[members] = [shards[j].sample_ids[o] for j, o in picks]
        self.held.update(zip(codes, shards))
        # Each stream's shard stays alive while the stream is inside it (`recent` only keeps the last few).
        stream_set = streams * n_sets + choices
        _, from_end = np.unique(stream_set[::-1], return_index=True)
        last = len(index) - 1 - from_end  # the last sample of each (stream, set) in this call
        self.current.flat[stream_set[last]] = shard_of[last]
        v_used, c_used = np.nonzero(self.current >= 0)
        in_use = set(np.unique(_code(c_used, self.current[v_used, c_used])).tolist())
        self.held = {code: shard for code, shard in self.held.items() if code in in_use}
        return choices, sample_ids

    def take_counters(self) -> tuple[int, int]:
        """Data errors met since the last call (they travel with the next sample or batch)."""
        counters = (self.lost, self.bad_shards)
        self.lost = self.bad_shards = 0
        return counters
