"""Muon on FSDP2 parameters: DTensors with Shard(0) placement on a 1-D mesh (`fully_shard`).

FSDP2 has already reduce-scattered (averaged) the gradients, so each rank holds row blocks of every matrix, its
momentum and its gradient. Per step:
  - momentum on the local rows (elementwise, as on one device);
  - 3-D expert stacks are sharded along the expert dimension, so every rank already holds whole experts:
    Newton–Schulz runs locally on them, no communication;
  - every 2-D matrix has one owner rank (longest-processing-time first by NS cost, counting the local experts'
    cost): one all-to-all sends the NS inputs' row blocks to the owners, owners run NS on whole matrices (each rank
    ~1/P of the work), a second all-to-all returns each rank its rows of O (row blocks are uneven: all-to-all
    takes uneven splits on gloo and NCCL alike);
  - the update is applied to the local rows.
Optimizer state is created with `zeros_like(param)`, i.e. DTensors with the parameter's placement, so
torch.distributed.checkpoint saves and loads it like AdamW's.
"""
from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor, Shard

from components.optim.comm import CountingComm
from components.optim.muon import FINITE, NO_GRAD, NONFINITE, group_key, local, orthogonalize
from components.optim.newton_schulz import resolve_dtype
from components.optim.telemetry import StepStats
from components.optim.update import apply_orthogonal, momentum_step, scaled_update, update_scale


def dtensor_comm(optimizer) -> CountingComm | None:
    meshes = {p.device_mesh for g in optimizer.param_groups for p in g["params"] if isinstance(p, DTensor)}
    if not meshes:
        return None
    if len(meshes) > 1:
        raise ValueError(f"Muon on DTensors: all parameters must share one device mesh, got {len(meshes)}")
    mesh = meshes.pop()
    if mesh.ndim != 1:
        raise ValueError(f"Muon on DTensors: mesh ndim={mesh.ndim} is unsupported; pass a 1-D data-parallel mesh")
    for g in optimizer.param_groups:
        for p in g["params"]:
            if not isinstance(p, DTensor) or tuple(p.placements) != (Shard(0),):
                raise ValueError(f"Muon on DTensors: every parameter must be a DTensor placed (Shard(0),), got "
                                 f"{type(p).__name__} {getattr(p, 'placements', None)}")
    return CountingComm(mesh.get_group())


def row_blocks(rows: int, world_size: int) -> list[tuple[int, int]]:
    """[start, end) rows of each rank under Shard(0) (torch.chunk sizes: ceil(rows/P), trailing ranks may be empty)."""
    chunk = math.ceil(rows / world_size) if rows else 0
    return [(min(r * chunk, rows), min((r + 1) * chunk, rows)) for r in range(world_size)]


def _local_matrix_range(p: DTensor) -> tuple[int, int]:
    """Global indices [first, last) of the matrices this rank holds of a stack [d0, ..., A, B] sharded on d0."""
    rank = p.device_mesh.get_local_rank()
    start, end = row_blocks(p.shape[0], p.device_mesh.size())[rank]
    inner = math.prod(p.shape[1:-2])
    return start * inner, end * inner


def dtensor_local_codes(p: DTensor, algorithm: str, n: int) -> torch.Tensor:
    """This rank's contribution to the global per-matrix codes (MAX-reduced over ranks by the caller)."""
    device = p._local_tensor.device
    codes = torch.zeros(n, device=device)
    if p.grad is None:
        return codes
    g = local(p.grad)
    if algorithm == "adamw":
        ok = bool(g.numel() == 0) or torch.isfinite(g).all()
        return torch.where(torch.as_tensor(ok, device=device), FINITE, NONFINITE).reshape(1).float()
    if p.ndim == 2:
        if g.numel():
            amax = g.abs().amax().reshape(1)
            codes = torch.where(torch.isfinite(amax), torch.where(amax > 0, FINITE, NO_GRAD), NONFINITE).float()
        return codes
    first, last = _local_matrix_range(p)
    if last > first:
        amax = g.abs().amax(dim=(-2, -1)).reshape(-1)
        codes[first:last] = torch.where(torch.isfinite(amax), torch.where(amax > 0, FINITE, NO_GRAD), NONFINITE)
    return codes


def _owners(params: list[DTensor], world_size: int) -> dict[int, int]:
    """Owner rank of each 2-D matrix: LPT by NS cost max·min², starting from each rank's local expert work."""
    load = [0] * world_size
    for p in params:
        if p.ndim >= 3:
            a, b = p.shape[-2:]
            inner = math.prod(p.shape[1:-2])
            for r, (s, e) in enumerate(row_blocks(p.shape[0], world_size)):
                load[r] += (e - s) * inner * max(a, b) * min(a, b) ** 2
    owners = {}
    matrices = sorted((i for i, p in enumerate(params) if p.ndim == 2),
                      key=lambda i: (-max(params[i].shape) * min(params[i].shape) ** 2, i))
    for i in matrices:
        a, b = params[i].shape
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[i] = rank
        load[rank] += max(a, b) * min(a, b) ** 2
    return owners


def muon_group_step_dtensor(optimizer, group: dict, codes: dict, stats: StepStats) -> None:
    comm: CountingComm = optimizer.comm
    world, rank = comm.world_size, comm.rank
    params = group["params"]
    cache = optimizer.__dict__.setdefault("_dtensor_owners", {})
    owners = cache.setdefault(id(group), _owners(params, world))
    key = group_key(group)
    lr, wd = group["lr"], group["weight_decay"]
    device = params[0]._local_tensor.device
    ns_dtype = resolve_dtype(group["ns_dtype"])
    outgoing = [[] for _ in range(world)]  # NS-input row blocks per owner rank
    matrices = []  # (index, param) of the 2-D matrices stepped this time, in group order (same on all ranks)
    for i, p in enumerate(params):
        if p.grad is None:
            continue
        active = codes[p] == FINITE
        if not bool(active.any()):
            continue
        buf = local(optimizer.state[p]["momentum_buffer"])
        w, g = local(p), local(p.grad)
        if p.ndim == 2:
            x = momentum_step(buf, g, group["momentum"], group["nesterov"])
            outgoing[owners[i]].append(x.reshape(-1).to(ns_dtype))
            matrices.append((i, p))
            continue
        first, last = _local_matrix_range(p)
        mine = active[first:last]
        keep = None if bool(mine.all()) else (~mine).to(device).view(*w.shape[:-2], 1, 1)
        x = momentum_step(buf, g, group["momentum"], group["nesterov"], keep)
        if x.numel():
            o = orthogonalize(x, group, stats)
            scale = update_scale(group["scale_mode"], x.shape, o, group["scale_hidden_size"])
            apply_orthogonal(w, o, scale, lr, wd, keep)
            if optimizer.telemetry:
                if keep is None:
                    stats.add(key, o, w, scale)
                else:
                    rows = mine.to(device).view(w.shape[:-2])
                    stats.add(key, o[rows], w, scale[rows] if isinstance(scale, torch.Tensor) else scale)
    if not matrices:
        return
    blocks = {i: row_blocks(p.shape[0], world) for i, p in matrices}
    cols = {i: p.shape[1] for i, p in matrices}
    recv_sizes = [sum((blocks[i][src][1] - blocks[i][src][0]) * cols[i] for i, _ in matrices if owners[i] == rank)
                  for src in range(world)]
    send = [torch.cat(t) if t else torch.zeros(0, dtype=ns_dtype, device=device) for t in outgoing]
    received = comm.all_to_all("gather_matrices_to_owner", send, recv_sizes, ns_dtype, device)
    # Owner: assemble each whole matrix from the ranks' row blocks, orthogonalize, cut the result into row blocks.
    by_norm = group["scale_mode"] == "update_norm"  # per-matrix scale needs the whole O: owners apply it
    back_dtype = params[0].dtype if by_norm else ns_dtype
    offsets = [0] * world
    returning = [[] for _ in range(world)]
    for i, p in matrices:
        if owners[i] != rank:
            continue
        parts = []
        for src in range(world):
            n = (blocks[i][src][1] - blocks[i][src][0]) * cols[i]
            parts.append(received[src][offsets[src]:offsets[src] + n])
            offsets[src] += n
        full = torch.cat(parts).view(p.shape)
        o = orthogonalize(full, group, stats)
        payload = scaled_update(o, update_scale("update_norm", p.shape, o), back_dtype) if by_norm else o
        for dst, (s, e) in enumerate(blocks[i]):
            returning[dst].append(payload[s:e].reshape(-1))
    send = [torch.cat(t) if t else torch.zeros(0, dtype=back_dtype, device=device) for t in returning]
    back_sizes = [sum((blocks[i][rank][1] - blocks[i][rank][0]) * cols[i] for i, _ in matrices if owners[i] == src)
                  for src in range(world)]
    returned = comm.all_to_all("scatter_updates_from_owner", send, back_sizes, back_dtype, device)
    offsets = [0] * world
    for i, p in matrices:
        src = owners[i]
        w = local(p)
        n = w.numel()
        piece = returned[src][offsets[src]:offsets[src] + n].view(w.shape)
        offsets[src] += n
        scale = 1.0 if by_norm else update_scale(group["scale_mode"], p.shape, None, group["scale_hidden_size"])
        apply_orthogonal(w, piece, scale, lr, wd)
        if optimizer.telemetry:
            stats.add(key, piece, w, scale)
