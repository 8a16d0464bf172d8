"""The canonical global sample sequence: a pure function of (seed, shard sets, mixture schedule, num_streams).

Global sample i (i = 0, 1, 2, ... over the whole job, all ranks together) is defined as follows.

1. Source. The mixture in force is the stage's mixture at token position `i * seq_len` (stages are defined in
   tokens, so the cooldown mix starts exactly at its token boundary). A counter-based hash u(seed, i) in [0, 1)
   picks the shard set s against that mixture's cumulative weights.
2. Virtual stream. i belongs to virtual stream v = i mod V at position p = i div V. Each virtual stream keeps its
   own cursor into every shard set: sample i is the k-th draw of stream v from set s, where k counts the
   positions before p of stream v that chose s. k is a pure function of i (a prefix count of hashes).
3. Set position. Set s (N samples, blocks of L = max(1, N div V) samples) is read block-cyclically over its
   infinite epoch sequence: draw k of stream v is position g = ((k div L) * V + v) * L + k mod L, epoch
   g div N, sample g mod N of that epoch's shard order. The shard order of an epoch is a permutation that is a
   pure function of (seed, set name, epoch). With N >= V, stream v reads one contiguous run of about N/V
   samples per epoch, so a worker that owns a few streams reads only its own shards.

Ownership (who reads which stream) is a separate, layout-dependent choice made in `stream.py`.

Chat sets (supervised fine-tuning) are read in exact epochs instead (`EpochLayout`): blocks of one sample, so
with one set in the mixture draw k of stream v is set position g = k * V + v = i itself, and epoch e is exactly
global samples [e * N, (e + 1) * N). Each epoch reshuffles, as a pure function of (seed, set name, epoch): the
shards are permuted, then the samples inside each shard (a reader still works through one shard at a time).
"""
from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np

_GOLDEN = 0x9E3779B97F4A7C15
_MASK = (1 << 64) - 1


def _splitmix64_scalar(x: int) -> int:
    x = (x + _GOLDEN) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def uniform(seed: int, index: np.ndarray) -> np.ndarray:
    """u(seed, i) in [0, 1): splitmix64 of the counter i keyed by the seed (float64, 53 random bits)."""
    key = np.uint64(_splitmix64_scalar(seed & _MASK))
    x = np.asarray(index, dtype=np.uint64) * np.uint64(_GOLDEN) + key
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


class MixturePlan:
    """Mixture weights by global sample index: stage k's weights apply from sample `starts[k]`."""

    def __init__(self, set_names: Sequence[str], stages: Sequence[tuple[int, Mapping[str, float]]], seq_len: int):
        self.set_names = list(set_names)
        self.seq_len = seq_len
        cum = []
        starts = []
        for k, (start_tokens, mixture) in enumerate(stages):
            unknown = sorted(set(mixture) - set(self.set_names))
            if unknown:
                raise ValueError(f"mixture of stage {k} names shard sets {unknown} that were not given; "
                                 f"known sets: {self.set_names}")
            weights = np.array([float(mixture.get(n, 0.0)) for n in self.set_names])
            if (weights < 0).any() or weights.sum() <= 0:
                raise ValueError(f"mixture of stage {k} = {dict(mixture)}: weights must be >= 0 with a positive sum")
            c = np.cumsum(weights / weights.sum())
            c[-1] = 1.0 + 1e-12  # u < 1 always lands in a set with positive weight
            cum.append(c)
            starts.append(-(-int(start_tokens) // seq_len))  # first sample whose start token is >= the boundary
        self.starts = np.array(starts, dtype=np.int64)
        self.cum = np.stack(cum)

    @classmethod
    def from_mixture(cls, set_names, mixture, seq_len: int) -> MixturePlan:
        """From a constant {set: weight} dict or a `StageSchedule` (its stage starts and mixtures)."""
        if hasattr(mixture, "stages"):
            if mixture.seq_len != seq_len:
                raise ValueError(f"schedule seq_len={mixture.seq_len} does not match the shards' seq_len={seq_len}")
            return cls(set_names, [(start, s.mixture) for s, start in zip(mixture.stages, mixture.starts)], seq_len)
        return cls(set_names, [(0, dict(mixture))], seq_len)

    def prefix(self, n: int) -> list:
        """The mixture of global samples [0, n): [first, end, [[set, weight], ...]] per stage that starts below n
        (weights normalized, sets in the order `choose` uses, zero weights left out). Two plans with equal prefixes
        choose the same set for every one of those samples."""
        out = []
        for k, start in enumerate(self.starts.tolist()):
            if start >= n and k > 0:
                break
            end = int(self.starts[k + 1]) if k + 1 < len(self.starts) else n
            weights = np.diff(np.concatenate([[0.0], np.minimum(self.cum[k], 1.0)]))
            out.append([start, min(end, n), [[name, float(w)] for name, w in zip(self.set_names, weights) if w > 0]])
        return out

    def choose(self, seed: int, index: np.ndarray) -> np.ndarray:
        """The shard set (its position in `set_names`) of each global sample index."""
        index = np.asarray(index, dtype=np.int64)
        stage = np.searchsorted(self.starts, index, side="right") - 1
        u = uniform(seed, index)
        cum = self.cum[stage]
        return (u[:, None] >= cum).sum(axis=1)


class SetLayout:
    """Where the k-th draw of virtual stream v from one shard set lies: (shard index, offset in shard)."""

    def __init__(self, name: str, shard_samples: Sequence[int], num_streams: int, seed: int, max_epochs_cached=4):
        self.name = name
        self.counts = np.asarray(shard_samples, dtype=np.int64)
        self.total = int(self.counts.sum())
        if self.total <= 0:
            raise ValueError(f"shard set {name!r} has no samples")
        self.num_streams = num_streams
        self.block = max(1, self.total // num_streams)
        self.seed = seed
        self._key = zlib.crc32(name.encode())
        self._epochs: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._max_epochs = max_epochs_cached

    def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard permutation, cumulative sample counts along it) for an epoch: a pure function of
        (seed, set name, epoch)."""
        found = self._epochs.get(epoch)
        if found is None:
            rng = np.random.default_rng([self.seed & _MASK, self._key, epoch])
            order = rng.permutation(len(self.counts))
            found = (order, np.cumsum(self.counts[order]))
            self._epochs[epoch] = found
            while len(self._epochs) > self._max_epochs:
                self._epochs.popitem(last=False)
        else:
            self._epochs.move_to_end(epoch)
        return found

    def set_position(self, stream: int, k: int) -> int:
        block = (k // self.block) * self.num_streams + stream
        return block * self.block + k % self.block

    def locate(self, stream: int, k: int) -> tuple[int, int, int]:
        """(epoch, shard index, offset within the shard) of draw k of virtual stream `stream`."""
        epochs, shards, offsets = self.locate_many(np.array([stream]), np.array([k]))
        return int(epochs[0]), int(shards[0]), int(offsets[0])

    def locate_many(self, streams: np.ndarray, ks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`locate` for arrays of (stream, draw) pairs."""
        block = (ks // self.block) * self.num_streams + streams
        g = block * self.block + ks % self.block
        epochs, pos = np.divmod(g, self.total)
        shards = np.empty_like(g)
        offsets = np.empty_like(g)
        for epoch in np.unique(epochs).tolist():
            sel = epochs == epoch
            order, cum = self.epoch_order(epoch)
            j = np.searchsorted(cum, pos[sel], side="right")
            shards[sel] = order[j]
            offsets[sel] = pos[sel] - (cum[j] - self.counts[order[j]])
        return epochs, shards, offsets


def count_draws(plan: MixturePlan, seed: int, stream: int, num_streams: int, start: int, end: int,
                chunk: int = 1 << 20) -> np.ndarray:
    """Draws per set of virtual stream `stream` over its positions [start, end), without reading any sample
    (what a resume, or positions owned by another worker, cost: hashing only)."""
    counts = np.zeros(len(plan.set_names), dtype=np.int64)
    for lo in range(start, end, chunk):
        index = stream + num_streams * np.arange(lo, min(end, lo + chunk), dtype=np.int64)
        counts += np.bincount(plan.choose(seed, index), minlength=len(counts))
    return counts


class EpochLayout(SetLayout):
    """`SetLayout` read in exact epochs with a per-epoch reshuffle of the shards and of the samples in each shard
    (see the module docstring); what a chat set uses."""

    def __init__(self, name: str, shard_samples: Sequence[int], num_streams: int, seed: int, max_epochs_cached=4):
        super().__init__(name, shard_samples, num_streams, seed, max_epochs_cached)
        self.block = 1
        self._inside: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def within_shard(self, epoch: int, shard: int) -> np.ndarray:
        """The order of shard `shard`'s samples in epoch `epoch`: a pure function of (seed, set name, epoch, shard)."""
        key = (epoch, shard)
        found = self._inside.get(key)
        if found is None:
            rng = np.random.default_rng([self.seed & _MASK, self._key, epoch, shard])
            found = self._inside[key] = rng.permutation(int(self.counts[shard]))
            while len(self._inside) > 64:
                self._inside.popitem(last=False)
        return found

    def locate_many(self, streams: np.ndarray, ks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        epochs, shards, offsets = super().locate_many(streams, ks)
        for epoch, shard in set(zip(epochs.tolist(), shards.tolist())):
            sel = (epochs == epoch) & (shards == shard)
            offsets[sel] = self.within_shard(epoch, shard)[offsets[sel]]
        return epochs, shards, offsets
