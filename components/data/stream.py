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

A yielded item is a dict: `input_ids` LongTensor[seq_len], `targets` LongTensor[seq_len] (the next tokens),
`index` (global sample index), `set_id` (position of the set in `set_names`), `sample_id` (the sample's position in
its set's packed token stream), `lost_samples` and `bad_shards` (data errors met since the previous item of this
worker; `StreamLoader` sums them into `stats`). `StreamLoader` is the way to train from it: it batches in the
workers, moves one packed tensor per group of micro-batches, and yields the same dicts collated.

Bad data: a truncated or corrupt tar, a malformed sample or a shard that went missing is logged once, its samples
are skipped and counted, and the stream goes on. Through `StreamLoader` a lost sample only makes its micro-batch
smaller (every other sample keeps its place, so resume stays exact); iterating the per-sample `__iter__` with a
plain DataLoader instead shifts that worker's later samples by one per hole. At construction, a missing manifest, a missing
shard file or a tokenizer fingerprint that does not match is a ValueError.
"""
from __future__ import annotations

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
from .sequence import MixturePlan, SetLayout, count_draws
from .shards import read_manifest
from .tarshard import ShardSamples, decode_shard

log = logging.getLogger(__name__)


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
    consumed_samples: global samples consumed so far (resume point).
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
        period = world_size * max(1, num_workers) * micro_batch_size
        if num_streams % period and world_size * max(1, num_workers) > 1:  # one reader owns all: no constraint
            raise ValueError(
                f"num_streams={num_streams} must be a multiple of world_size*max(1,num_workers)*micro_batch_size"
                f" = {world_size}*{max(1, num_workers)}*{micro_batch_size} = {period}, so that every virtual stream"
                " has one owner; choose num_streams as a multiple of every layout the job may resume on")
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
        self.plan = MixturePlan.from_mixture(self.set_names, mixture, self.seq_len)
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.micro_batch_size, self.num_streams, self.seed = micro_batch_size, num_streams, seed
        self.consumed_samples, self.stop_samples = consumed_samples, stop_samples
        self.cache_shards = cache_shards

    # -- resume state: one global number --------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "num_streams": self.num_streams, "seed": self.seed}

    def load_state_dict(self, state: Mapping) -> None:
        for key in ("num_streams", "seed"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"resume state has {key}={state[key]}, this stream has {getattr(self, key)}; "
                                 "the data order would change")
        self.consumed_samples = int(state["consumed_samples"])

    # -- iteration ------------------------------------------------------------------------------------------
    def worker_indices(self, worker: int, num_workers: int, start: int | None = None):
        """Global sample indices this (rank, worker) yields, in order, as successive micro-batch arrays."""
        W, b, K = self.world_size, self.micro_batch_size, max(1, num_workers)
        start = self.consumed_samples if start is None else start
        first = start + (self.rank - start) % W  # first global index >= start on this rank
        m = 0
        while True:
            j = (m * K + worker) * b + np.arange(b, dtype=np.int64)
            index = first + j * W
            if self.stop_samples is not None:
                index = index[index < self.stop_samples]
                if index.size == 0:
                    return
            yield index
            m += 1

    def micro_batches(self, group: int = 1):
        """Per micro-batch of this (rank, worker): (reader, global indices, [(index, set_id, token row,
        sample_id) or None where lost]). Must run in the DataLoader worker (or the main process if none).
        `group` micro-batches are located together (fewer, larger numpy calls; same result)."""
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 0)
        if num_workers != self.num_workers:
            raise ValueError(f"MixtureStream was built for num_workers={self.num_workers} but the DataLoader runs "
                             f"{num_workers}; pass the same number to both")
        reader = _WorkerReader(self)
        indices = self.worker_indices(worker, num_workers)
        while True:
            chunk = list(itertools.islice(indices, group))
            if not chunk:
                return
            index = np.concatenate(chunk)
            samples = reader.batch(index, self.plan.choose(self.seed, index))
            start = 0
            for part in chunk:
                yield reader, part, samples[start:start + len(part)]
                start += len(part)

    def __iter__(self):
        """One dict per sample (see the module docstring); collate with DataLoader(batch_size=micro_batch_size)."""
        for reader, _, samples in self.micro_batches():
            for found in samples:
                if found is None:
                    continue
                i, set_id, row, sample_id = found
                tokens = torch.from_numpy(row.astype(np.int64))
                lost, bad = reader.take_counters()
                yield {"input_ids": tokens[:-1], "targets": tokens[1:], "index": i, "set_id": set_id,
                       "sample_id": sample_id, "lost_samples": lost, "bad_shards": bad}


class _WorkerReader:
    """The per-worker state: virtual-stream cursors, set layouts and decoded shards."""

    def __init__(self, stream: MixtureStream):
        self.stream = stream
        self.layouts = [SetLayout(s.name, s.shard_samples, stream.num_streams, stream.seed) for s in stream.sets]
        n_sets, V = len(self.layouts), stream.num_streams
        self.position = np.zeros(V, dtype=np.int64)        # next position of each virtual stream
        self.draws = np.zeros((V, n_sets), dtype=np.int64)  # draws so far of each virtual stream from each set
        self.current: dict[tuple[int, int], tuple[int, ShardSamples]] = {}  # (stream, set) -> shard being read
        self.live: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self.recent: OrderedDict = OrderedDict()
        self.lost = self.bad_shards = 0

    def shard(self, set_id: int, shard_index: int) -> ShardSamples:
        key = (set_id, shard_index)
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
                data = remote.read_bytes(url)
                break
            except OSError as err:  # missing file, network error: counted below, never raised
                error = f"{type(err).__name__}: {err}"
        shard = decode_shard(data, int(entry["samples"]), int(shard_set.manifest["sample_tokens"]),
                             shard_set.manifest["dtype"], error)
        if shard.error is not None or shard.bad:
            self.bad_shards += 1
            log.warning("shard %s: %s; %d of %d samples lost", url, shard.error or "malformed samples",
                        int(entry["samples"]) - shard.valid, int(entry["samples"]))
        return shard

    def batch(self, index: np.ndarray, choices: np.ndarray) -> list:
        """(index, set_id, token row, sample_id) per global sample, None where lost. `index` is increasing and may
        hold several positions of one virtual stream (several micro-batches at once): draw k of each sample is
        the stream's draws so far from its set plus the earlier samples of this call with the same (stream, set)."""
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
        out = []
        for i, v, c, shard_index, offset in zip(index.tolist(), streams.tolist(), choices.tolist(),
                                                shard_of.tolist(), offset_of.tolist()):
            current = self.current.get((v, c))
            if current is None or current[0] != shard_index:
                current = self.current[(v, c)] = (shard_index, self.shard(c, shard_index))
            shard = current[1]
            if offset >= shard.valid:
                self.lost += 1
                out.append(None)
            else:
                out.append((i, c, shard.tokens[offset], int(shard.sample_ids[offset])))
        return out

    def take_counters(self) -> tuple[int, int]:
        """Data errors met since the last call (they travel with the next sample or batch)."""
        counters = (self.lost, self.bad_shards)
        self.lost = self.bad_shards = 0
        return counters
