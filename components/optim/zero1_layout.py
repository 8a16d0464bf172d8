"""Where each parameter lives in ZeRO-1's flat buffer, and what that costs in communication.

Every rank owns one contiguous shard [r·S, (r+1)·S) of a flat buffer holding all parameters. Two partitions:

- 'flat' (Moonlight Algorithm 1 / Megatron PR #1428): parameters back to back in model order. A Muon matrix that
  straddles a shard boundary is completed from its neighbours' pieces before Newton–Schulz (the DP gather of
  Algorithm 1, needed only for those few matrices).
- 'owner': every Muon parameter sits wholly in one shard, assigned longest-processing-time first by NS cost
  (`owners.assign_owners`) under a per-rank size cap; AdamW parameters fill the remaining space and may be cut
  anywhere (AdamW is elementwise). No gather is needed; the cost is a little padding at most.

Pure planning: the optimizer and the communication benchmark both read the byte counts from here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from components.optim.owners import assign_owners, ns_cost

PARTITIONS = ("flat", "owner")


@dataclass(frozen=True)
class ParamInfo:
    index: int
    shape: tuple[int, ...]
    algorithm: str  # 'muon' | 'adamw'

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def matrix_numel(self) -> int:
        """Elements of one matrix (one expert of a stack) for Muon; the whole tensor for AdamW."""
        return self.shape[-2] * self.shape[-1] if self.algorithm == "muon" else self.numel

    @property
    def ns_cost(self) -> int:
        return ns_cost(self.shape)


@dataclass(frozen=True)
class Piece:
    """Elements [start, start + length) of parameter `param` (flattened) stored at buffer[offset:offset + length]."""

    param: int
    start: int
    length: int
    offset: int


@dataclass
class Zero1Layout:
    params: list[ParamInfo]
    world_size: int
    shard_size: int
    pieces: list[Piece]
    partition: str
    _by_param: dict[int, list[Piece]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.pieces.sort(key=lambda pc: pc.offset)
        for pc in self.pieces:
            self._by_param.setdefault(pc.param, []).append(pc)

    @property
    def total(self) -> int:
        return self.world_size * self.shard_size

    def shard(self, rank: int) -> tuple[int, int]:
        return rank * self.shard_size, (rank + 1) * self.shard_size

    def pieces_of(self, param: int) -> list[Piece]:
        return self._by_param.get(param, [])

    def pieces_in(self, rank: int) -> list[tuple[Piece, int, int]]:
        """(piece, lo, hi): the part [lo, hi) of each piece (buffer coordinates) inside `rank`'s shard."""
        lo, hi = self.shard(rank)
        out = []
        for pc in self.pieces:
            a, b = max(lo, pc.offset), min(hi, pc.offset + pc.length)
            if a < b:
                out.append((pc, a, b))
        return out

    def needed(self, rank: int) -> list[tuple[int, int]]:
        """Buffer ranges outside `rank`'s shard that complete the Muon matrices straddling its boundaries."""
        lo, hi = self.shard(rank)
        out = []
        for pc, a, b in self.pieces_in(rank):
            info = self.params[pc.param]
            if info.algorithm != "muon":
                continue
            mn = info.matrix_numel
            first = pc.offset + ((a - pc.offset) // mn) * mn
            last = pc.offset + math.ceil((b - pc.offset) / mn) * mn
            if first < lo:
                out.append((first, lo))
            if last > hi:
                out.append((hi, last))
        return out

    def exchange_sizes(self, src: int, dst: int) -> list[tuple[int, int]]:
        """Ranges of `src`'s shard that `dst` needs (empty when src == dst)."""
        if src == dst:
            return []
        lo, hi = self.shard(src)
        return [(max(a, lo), min(b, hi)) for a, b in self.needed(dst) if max(a, lo) < min(b, hi)]

    def step_bytes(self, rank: int, grad_bytes: int = 4, param_bytes: int = 4, ns_bytes: int = 2,
                   code_count: int = 0, telemetry_keys: int = 0) -> dict[str, int]:
        """Bytes this rank sends per step, per collective (ring model: reduce-scatter and all-gather send
        (P−1)/P of the full buffer, all-reduce twice that; all-to-all sends exactly what the others need)."""
        p = self.world_size
        out = {
            "reduce_scatter_grads": sent_bytes("reduce_scatter", self.total * grad_bytes, p),
            "all_gather_params": sent_bytes("all_gather", self.total * param_bytes, p),
        }
        exchanged = sum(b - a for dst in range(p) for a, b in self.exchange_sizes(rank, dst))
        if self.needs_exchange():
            out["gather_boundary_matrices"] = exchanged * ns_bytes
        if code_count:
            out["all_reduce_grad_codes"] = sent_bytes("all_reduce", code_count * 4, p)
        if telemetry_keys:
            out["all_reduce_telemetry"] = sent_bytes("all_reduce", telemetry_keys * 4 * 8, p)
        return out

    def needs_exchange(self) -> bool:
        return any(self.needed(r) for r in range(self.world_size))


def code_count(params: list[ParamInfo]) -> int:
    """Length of the per-step gradient-summary vector: one code per Muon matrix, one per AdamW tensor."""
    return sum(p.numel // p.matrix_numel if p.algorithm == "muon" else 1 for p in params)


def sent_bytes(collective: str, nbytes: int, world_size: int) -> int:
    """Bytes one rank sends in a ring collective whose full buffer is `nbytes`."""
    ring = (world_size - 1) / world_size
    factor = {"reduce_scatter": ring, "all_gather": ring, "all_reduce": 2 * ring}[collective]
    return int(factor * nbytes)


def plan_layout(params: list[ParamInfo], world_size: int, partition: str = "flat") -> Zero1Layout:
    if partition not in PARTITIONS:
        raise ValueError(f"partition={partition!r} is unknown; choose one of {PARTITIONS}")
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    total = sum(p.numel for p in params)
    cap = max(1, math.ceil(total / world_size))
    if partition == "flat":
        pieces, offset = [], 0
        for info in params:
            pieces.append(Piece(info.index, 0, info.numel, offset))
            offset += info.numel
        return Zero1Layout(params, world_size, cap, pieces, partition)

    owner = assign_owners([(p.index, p.ns_cost, p.numel) for p in params if p.algorithm == "muon"], world_size,
                          capacity=cap)
    load = [0] * world_size
    for info in params:
        if info.index in owner:
            load[owner[info.index]] += info.numel
    shard = max([cap, *load])
    pieces, fill = [], []
    for rank in range(world_size):
        offset = rank * shard
        for info in params:
            if owner.get(info.index) == rank:
                pieces.append(Piece(info.index, 0, info.numel, offset))
                offset += info.numel
        fill.append([offset, (rank + 1) * shard])
    region = 0
    for info in params:
        if info.algorithm == "muon":
            continue
        start = 0
        while start < info.numel:
            while fill[region][0] == fill[region][1]:
                region += 1
            take = min(info.numel - start, fill[region][1] - fill[region][0])
            pieces.append(Piece(info.index, start, take, fill[region][0]))
            fill[region][0] += take
            start += take
    return Zero1Layout(params, world_size, shard, pieces, partition)


def zero1_adamw_bytes(numel: int, world_size: int, grad_bytes: int = 4, param_bytes: int = 4) -> int:
    """ZeRO-1 AdamW per rank and step: reduce-scatter gradients + all-gather parameters of the padded buffer."""
    total = math.ceil(numel / world_size) * world_size
    return (sent_bytes("reduce_scatter", total * grad_bytes, world_size)
            + sent_bytes("all_gather", total * param_bytes, world_size))
