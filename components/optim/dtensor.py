"""Muon on FSDP2 parameters: DTensors with Shard(0) placement on a 1-D mesh (`fully_shard`).

FSDP2 has already reduce-scattered (averaged) the gradients, so each rank holds row blocks of every matrix, its
momentum and its gradient. Per step:
  - momentum on the local rows (elementwise, as on one device);
  - 3-D expert stacks are sharded along the expert dimension, so every rank already holds whole experts:
    `muon_matrix_step` runs locally on them, no communication;
  - every 2-D matrix has one owner rank (longest-processing-time first by NS cost, counting the local experts'
    cost; planned once at construction): one all-to-all sends the NS inputs' row blocks to the owners, owners
    run NS on whole matrices (each rank ~1/P of the work), a second all-to-all returns each rank its rows of O
    (row blocks are uneven: all-to-all takes uneven splits on gloo and NCCL alike);
  - the update is applied to the local rows.
A head-blocked matrix (head_blocks.py) travels the same way; its owner orthogonalizes it block by block.
Optimizer state is created with `zeros_like(param)`, i.e. DTensors with the parameter's placement, so
torch.distributed.checkpoint saves and loads it like AdamW's.
"""
from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor, Shard

from components.optim.comm import CountingComm
from components.optim.head_blocks import block_shape, block_view, unblock
from components.optim.muon import (
    FINITE,
    Muon,
    group_blocks,
    group_key,
    local,
    muon_matrix_step,
    orthogonal_update,
    param_names,
)
from components.optim.newton_schulz import resolve_dtype
from components.optim.owners import assign_owners, ns_cost
from components.optim.telemetry import StepStats
from components.optim.update import apply_orthogonal, momentum_step, scaled_update, update_scale


class DTensorMuon(Muon):
    """`Muon` over FSDP2 parameters (every one a DTensor placed (Shard(0),) on one 1-D mesh). Constructed like
    `Muon`; the mesh's process group, each parameter's local matrix range and the owner of every 2-D matrix are
    fixed here, once."""

    def _check_placement(self, group: dict) -> None:
        for p, name in zip(group["params"], param_names(group)):
            if not isinstance(p, DTensor) or tuple(p.placements) != (Shard(0),):
                raise ValueError(f"Muon on DTensors: every parameter must be a DTensor placed (Shard(0),), got "
                                 f"{name!r}: {type(p).__name__} {getattr(p, 'placements', None)}")

    def _init_state(self) -> None:
        meshes = {p.device_mesh for g in self.param_groups for p in g["params"]}
        if len(meshes) != 1:
            raise ValueError(f"Muon on DTensors: all parameters must share one device mesh, got {len(meshes)}")
        mesh = meshes.pop()
        if mesh.ndim != 1:
            raise ValueError(f"Muon on DTensors: mesh ndim={mesh.ndim} is unsupported; pass a 1-D data-parallel mesh")
        self.comm = CountingComm(mesh.get_group())
        self._ranges = {p: local_matrix_range(p) if p.ndim >= 3 and g["algorithm"] == "muon" else None
                        for g in self.param_groups for p in g["params"]}
        self.owners: dict[DTensor, int] = {}  # the rank that orthogonalizes each 2-D matrix
        for g in self.param_groups:
            if g["algorithm"] == "muon":
                self.owners.update(plan_owners(g["params"], self.comm.world_size, group_blocks(g)))
        super()._init_state()

    def _matrix_range(self, p: torch.Tensor, algorithm: str, n: int) -> tuple[int, int]:
        """Stacks: the experts this rank holds; 2-D matrices and AdamW tensors: every rank contributes to all."""
        return self._ranges[p] or (0, n)

    def _muon_group_step(self, group: dict, codes: dict, stats: StepStats) -> None:
        comm = self.comm
        world, rank = comm.world_size, comm.rank
        params = group["params"]
        heads = dict(zip(params, group_blocks(group)))
        key = group_key(group)
        device = params[0]._local_tensor.device
        ns_dtype = resolve_dtype(group["ns_dtype"])
        outgoing = [[] for _ in range(world)]  # NS-input row blocks per owner rank
        matrices = []  # the 2-D matrices stepped this time, in group order (the same on all ranks)
        for p in params:
            active = codes[p] == FINITE
            if p.grad is None or not bool(active.any()):
                continue
            buf, w, g = local(self.state[p]["momentum_buffer"]), local(p), local(p.grad)
            if p.ndim == 2:
                x = momentum_step(buf, g, group["momentum"], group["nesterov"],
                                  out=torch.empty(g.shape, dtype=ns_dtype, device=device))
                outgoing[self.owners[p]].append(x.reshape(-1))
                matrices.append(p)
            else:
                first, last = self._ranges[p]
                muon_matrix_step(w, g, buf, active[first:last], group, stats, self.telemetry)
        if not matrices:
            return
        blocks = {p: row_blocks(p.shape[0], world) for p in matrices}

        def elements(p: DTensor, r: int) -> int:
            return (blocks[p][r][1] - blocks[p][r][0]) * p.shape[1]

        owned = [p for p in matrices if self.owners[p] == rank]
        recv_sizes = [sum(elements(p, src) for p in owned) for src in range(world)]
        send = [torch.cat(t) if t else torch.zeros(0, dtype=ns_dtype, device=device) for t in outgoing]
        received = comm.all_to_all("gather_matrices_to_owner", send, recv_sizes, ns_dtype, device)
        # Owner: assemble each whole matrix from the ranks' row blocks, orthogonalize, cut the result into row blocks.
        by_norm = group["scale_mode"] == "update_norm"  # per-matrix scale needs the whole O: owners apply it
        back_dtype = params[0].dtype if by_norm else ns_dtype
        offsets = [0] * world
        returning = [[] for _ in range(world)]
        for p in owned:
            parts = []
            for src in range(world):
                n = elements(p, src)
                parts.append(received[src][offsets[src]:offsets[src] + n])
                offsets[src] += n
            o, scale = orthogonal_update(block_view(torch.cat(parts).view(p.shape), heads[p]), group, stats)
            payload = unblock(scaled_update(o, scale, back_dtype) if by_norm else o, heads[p])
            for dst, (s, e) in enumerate(blocks[p]):
                returning[dst].append(payload[s:e].reshape(-1))
        send = [torch.cat(t) if t else torch.zeros(0, dtype=back_dtype, device=device) for t in returning]
        back_sizes = [sum(elements(p, rank) for p in matrices if self.owners[p] == src) for src in range(world)]
        returned = comm.all_to_all("scatter_updates_from_owner", send, back_sizes, back_dtype, device)
        offsets = [0] * world
        for p in matrices:
            src = self.owners[p]
            w = local(p)
            n = w.numel()
            piece = returned[src][offsets[src]:offsets[src] + n].view(w.shape)
            offsets[src] += n
            scale = 1.0 if by_norm else update_scale(group["scale_mode"], block_shape(p.shape, heads[p]), None,
                                                     group["scale_hidden_size"], group["update_rms"])
            squares = apply_orthogonal(w, piece, scale, group["lr"], group["weight_decay"], squares=self.telemetry)
            if squares is not None:
                stats.add_squares(key, squares[0], piece.numel(), squares[1], w.numel())


def row_blocks(rows: int, world_size: int) -> list[tuple[int, int]]:
    """[start, end) rows of each rank under Shard(0) (torch.chunk sizes: ceil(rows/P), trailing ranks may be empty)."""
    chunk = math.ceil(rows / world_size) if rows else 0
    return [(min(r * chunk, rows), min((r + 1) * chunk, rows)) for r in range(world_size)]


def local_matrix_range(p: DTensor) -> tuple[int, int]:
    """Global indices [first, last) of the matrices this rank holds of a stack [d0, ..., A, B] sharded on d0."""
    rank = p.device_mesh.get_local_rank()
    start, end = row_blocks(p.shape[0], p.device_mesh.size())[rank]
    inner = math.prod(p.shape[1:-2])
    return start * inner, end * inner


def plan_owners(params: list[DTensor], world_size: int, blocks: list | None = None) -> dict[DTensor, int]:
    """Owner rank of each 2-D matrix of a Muon group: LPT by NS cost (of its head blocks, where it has them),
    starting from each rank's local expert work."""
    start = [0] * world_size
    for p in params:
        if p.ndim >= 3:
            for r, (s, e) in enumerate(row_blocks(p.shape[0], world_size)):
                start[r] += ns_cost((e - s, *p.shape[1:]))
    blocks = blocks or [None] * len(params)
    owners = assign_owners([(i, ns_cost(block_shape(p.shape, spec)), p.numel())
                            for i, (p, spec) in enumerate(zip(params, blocks)) if p.ndim == 2], world_size, start)
    return {params[i]: rank for i, rank in owners.items()}
