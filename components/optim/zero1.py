"""ZeRO-1 Distributed Muon (Moonlight Algorithm 1) for a model that is NOT wrapped in DDP.

Every rank runs backward on its own micro-batches; `step()` then
  1. reduce-scatters (averages) the gradients of a flat buffer: each rank gets its shard   (Alg. 1 line 2)
  2. updates momentum / Adam moments of its shard only                                  (line 3)
  3. completes the Muon matrices that straddle its shard boundaries from the neighbours'
     pieces (one all-to-all of the NS inputs, in the NS dtype) — the DP gather, only where needed (line 4)
  4. runs Newton–Schulz on the matrices overlapping its shard and keeps its slice         (lines 5–6)
  5. applies the update to its slice of the parameters and all-gathers them               (lines 7–8)
The arithmetic is the single-device step's (`update.py`), so results equal `Muon` on the same global batch.
A head-blocked matrix (head_blocks.py) sits in the buffer in block order, as a stack of its heads' blocks.

`full_state_dict()` / `load_full_state_dict()` convert to and from exactly the single-device `Muon.state_dict()`
format (any world size); `state_dict()` / `load_state_dict()` hold this rank's shard (same world size only).
`comm.last` counts the bytes each collective sent in the last step.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from components.optim.comm import CountingComm
from components.optim.head_blocks import block_shape, block_view, from_block_order, to_block_order
from components.optim.muon import FINITE, NO_GRAD, Muon, group_blocks, group_key, orthogonal_update
from components.optim.newton_schulz import resolve_dtype
from components.optim.telemetry import StepStats
from components.optim.update import adamw_step, apply_orthogonal, momentum_step, scaled_update
from components.optim.zero1_layout import ParamInfo, code_count, plan_layout


class ZeroOneMuon(Muon):
    """`Muon` with its state sharded over `process_group` (ZeRO-1). Constructed like `Muon`, plus
    `process_group` and `partition` ('flat' = Algorithm 1 with boundary gathers; 'owner' = whole matrices per rank).
    """

    def __init__(self, params, *, process_group=None, partition: str = "flat", **kwargs):
        if not dist.is_initialized():
            raise RuntimeError("ZeroOneMuon needs an initialized torch.distributed process group")
        self.process_group = process_group
        self.partition = partition
        super().__init__(params, **kwargs)

    # ----------------------------------------------------------------------------------------- construction
    def _init_state(self) -> None:
        self.comm = CountingComm(self.process_group)
        self.world_size, self.rank = self.comm.world_size, self.comm.rank
        self._params = [p for g in self.param_groups for p in g["params"]]
        self._group_of = [gi for gi, g in enumerate(self.param_groups) for _ in g["params"]]
        self._specs = [spec for g in self.param_groups for spec in group_blocks(g)]
        infos = [ParamInfo(i, block_shape(p.shape, self._specs[i]), self.param_groups[self._group_of[i]]["algorithm"])
                 for i, p in enumerate(self._params)]
        dtypes = {p.dtype for p in self._params}
        if len(dtypes) > 1:
            raise ValueError(f"ZeroOneMuon: all parameters must share one dtype, got {sorted(map(str, dtypes))}")
        ns = {g["ns_dtype"] for g in self.param_groups if g["algorithm"] == "muon"}
        if len(ns) > 1:
            raise ValueError(f"ZeroOneMuon: all Muon groups must share ns_dtype, got {sorted(ns)}")
        self._ns_dtype = resolve_dtype(ns.pop()) if ns else torch.float32
        self.layout = plan_layout(infos, self.world_size, self.partition)
        ref = self._params[0]
        shard = self.layout.shard_size
        self._first = torch.zeros(shard, dtype=ref.dtype, device=ref.device)  # Muon momentum / Adam exp_avg
        self._second = torch.zeros(shard, dtype=ref.dtype, device=ref.device)  # Adam exp_avg_sq
        self._steps = torch.zeros(len(self._params), dtype=torch.float32)  # AdamW step count per parameter
        self._mine = self.layout.pieces_in(self.rank)
        self._exchange = self.layout.needs_exchange()

    @torch.no_grad()
    def broadcast_parameters(self, src: int = 0) -> None:
        """Make every rank's parameters equal to rank `src`'s (of the process group); ZeRO-1 assumes they are."""
        for p in self._params:
            dist.broadcast(p.data, group=self.process_group, group_src=src)

    def expected_comm_bytes(self) -> dict[str, int]:
        """The per-collective bytes `comm.last` should show after a step, computed from the layout alone."""
        item = self._first.element_size()
        ns_item = torch.empty(0, dtype=self._ns_dtype).element_size()
        keys = len({group_key(g) for g in self.param_groups}) if self.telemetry else 0
        return self.layout.step_bytes(self.rank, item, item, ns_item, code_count(self.layout.params), keys)

    # ----------------------------------------------------------------------------------------- the step
    def _update(self, codes: dict, stats: StepStats) -> None:
        lo, _ = self.layout.shard(self.rank)
        ref = self._first
        flat = torch.zeros(self.layout.total, dtype=ref.dtype, device=ref.device)
        for pc in self.layout.pieces:
            g = self._params[pc.param].grad
            if g is not None:
                flat[pc.offset:pc.offset + pc.length] = to_block_order(g, self._specs[pc.param])[
                    pc.start:pc.start + pc.length]
        grad = torch.empty_like(ref)
        self.comm.reduce_scatter_avg("reduce_scatter_grads", grad, flat)
        del flat
        weights = torch.zeros_like(ref)
        for pc, a, b in self._mine:
            p = self._params[pc.param]
            weights[a - lo:b - lo] = to_block_order(p.detach(), self._specs[pc.param])[
                pc.start + a - pc.offset:pc.start + b - pc.offset]
        for group in self.param_groups:
            stats.ensure(group_key(group), ref.device)
        for i, p in enumerate(self._params):
            if self.param_groups[self._group_of[i]]["algorithm"] == "adamw" and float(codes[p][0]) != NO_GRAD:
                self._steps[i] += 1
        self._adamw_shard(codes, grad, weights, stats)
        self._muon_shard(codes, grad, weights, stats)
        full = torch.empty(self.layout.total, dtype=ref.dtype, device=ref.device)
        self.comm.all_gather("all_gather_params", full, weights)
        for pc in self.layout.pieces:
            spec, data = self._specs[pc.param], self._params[pc.param].data
            if spec is None:
                data.view(-1)[pc.start:pc.start + pc.length] = full[pc.offset:pc.offset + pc.length]
            else:  # a Muon matrix: always one whole piece
                block_view(data, spec).copy_(full[pc.offset:pc.offset + pc.length].view(block_shape(data.shape, spec)))

    def _adamw_shard(self, codes, grad, weights, stats) -> None:
        lo, _ = self.layout.shard(self.rank)
        for gi, group in enumerate(self.param_groups):
            if group["algorithm"] != "adamw":
                continue
            views, steps = [], []
            for pc, a, b in self._mine:
                p = self._params[pc.param]
                if self._group_of[pc.param] == gi and float(codes[p][0]) != NO_GRAD:
                    s = slice(a - lo, b - lo)
                    views.append((weights[s], grad[s], self._first[s], self._second[s]))
                    steps.append(float(self._steps[pc.param]))
            ps, gs, ms, vs = (list(t) for t in zip(*views)) if views else ([], [], [], [])
            squares = adamw_step(ps, gs, ms, vs, steps, group["lr"], group["weight_decay"], group["adamw_betas"],
                                 group["adamw_eps"], want_update=self.telemetry)
            if self.telemetry:
                n = sum(w.numel() for w in ps)
                stats.add_squares(group_key(group), squares[0].sum(), n, squares[1].sum(), n)

    def _muon_shard(self, codes, grad, weights, stats) -> None:
        """Momentum on the shard, complete straddling matrices, NS, update this rank's slice (Alg. 1 lines 3–7)."""
        lo, hi = self.layout.shard(self.rank)
        x = torch.zeros(self.layout.shard_size, dtype=self._ns_dtype, device=grad.device)
        tasks = []
        for pc, a, b in self._mine:
            group = self.param_groups[self._group_of[pc.param]]
            if group["algorithm"] != "muon":
                continue
            p = self._params[pc.param]
            active = codes[p] == FINITE
            if not bool(active.any()):
                continue
            if self._specs[pc.param] is not None:  # one code per parameter: every head block steps
                active = active.expand(self._specs[pc.param][1])
            mn = self.layout.params[pc.param].matrix_numel
            k0, k1 = (a - pc.offset) // mn, math.ceil((b - pc.offset) / mn)
            keep = None
            if not bool(active[k0:k1].all()):
                # only this rank's matrices, expanded on the gradient's device
                per_elem = (~active[k0:k1]).to(grad.device).repeat_interleave(mn)
                keep = per_elem[a - pc.offset - k0 * mn:b - pc.offset - k0 * mn]
            s = slice(a - lo, b - lo)
            momentum_step(self._first[s], grad[s], group["momentum"], group["nesterov"], keep, out=x[s])
            tasks.append((pc, a, b, k0, k1, keep))
        ext, ext_lo = self._complete_boundaries(x, lo, hi)
        for pc, a, b, k0, k1, keep in tasks:
            group = self.param_groups[self._group_of[pc.param]]
            shape = self.layout.params[pc.param].shape
            mn = shape[-2] * shape[-1]
            start = pc.offset + k0 * mn - ext_lo
            inp = ext[start:start + (k1 - k0) * mn]
            inp = inp.view(shape) if len(shape) == 2 else inp.view(k1 - k0, *shape[-2:])
            o, scale = orthogonal_update(inp, group, stats)
            cut = slice(a - pc.offset - k0 * mn, b - pc.offset - k0 * mn)
            if isinstance(scale, torch.Tensor):  # one scale per matrix (update_norm): materialize s·O first
                o, scale = scaled_update(o, scale, weights.dtype), 1.0
            mine = o.reshape(-1)[cut]
            s = slice(a - lo, b - lo)
            squares = apply_orthogonal(weights[s], mine, scale, group["lr"], group["weight_decay"], keep,
                                       squares=self.telemetry and keep is None)
            if squares is not None:
                stats.add_squares(group_key(group), squares[0], mine.numel(), squares[1], mine.numel())
            elif self.telemetry:
                stats.add(group_key(group), mine[~keep], weights[s], scale)

    def _complete_boundaries(self, x: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, int]:
        """All-to-all of the NS-input pieces neighbours need; returns the extended buffer and its start offset."""
        if not self._exchange:
            return x, lo
        send = []
        for dst in range(self.world_size):
            ranges = self.layout.exchange_sizes(self.rank, dst)
            send.append(torch.cat([x[a - lo:b - lo] for a, b in ranges]) if ranges else x[:0])
        recv_sizes = [sum(b - a for a, b in self.layout.exchange_sizes(src, self.rank))
                      for src in range(self.world_size)]
        recv = self.comm.all_to_all("gather_boundary_matrices", send, recv_sizes, x.dtype, x.device)
        left = [recv[src] for src in range(self.rank)]
        right = [recv[src] for src in range(self.rank + 1, self.world_size)]
        ext = torch.cat([*left, x, *right])
        return ext, lo - sum(t.numel() for t in left)

    # ----------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["zero1"] = {"world_size": self.world_size, "rank": self.rank, "partition": self.partition,
                       "shard_size": self.layout.shard_size, "first": self._first.clone(),
                       "second": self._second.clone(), "steps": self._steps.clone()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        z = state_dict.get("zero1")
        if z is None:
            raise ValueError("ZeroOneMuon.load_state_dict: no 'zero1' shard in this state dict; a single-device "
                             "format state dict goes through load_full_state_dict()")
        mine = (self.world_size, self.rank, self.partition, self.layout.shard_size)
        if (z["world_size"], z["rank"], z["partition"], z["shard_size"]) != mine:
            raise ValueError(f"ZeroOneMuon.load_state_dict: saved (world_size, rank, partition, shard_size)="
                             f"{(z['world_size'], z['rank'], z['partition'], z['shard_size'])} != {mine}; each rank "
                             "loads its own shard, or use full_state_dict() / load_full_state_dict()")
        super().load_state_dict({"state": {}, "param_groups": state_dict["param_groups"]})
        self._first.copy_(z["first"])
        self._second.copy_(z["second"])
        self._steps.copy_(z["steps"])

    def full_state_dict(self, rank0_only: bool = False) -> dict:
        """Collective. The single-device `Muon.state_dict()` of the same parameters ({} off rank 0 if rank0_only)."""
        buffers = []
        for buf in (self._first, self._second):
            full = torch.empty(self.layout.total, dtype=buf.dtype, device=buf.device)
            self.comm.all_gather(None, full, buf)
            buffers.append(full)
        if rank0_only and self.rank != 0:
            return {}
        state = {}
        for i, p in enumerate(self._params):
            pieces = sorted(self.layout.pieces_of(i), key=lambda pc: pc.start)
            first, second = (from_block_order(torch.cat([buf[pc.offset:pc.offset + pc.length] for pc in pieces]),
                                              p.shape, self._specs[i]).clone() for buf in buffers)
            if self.param_groups[self._group_of[i]]["algorithm"] == "muon":
                state[i] = {"momentum_buffer": first}
            else:
                state[i] = {"step": self._steps[i].clone(), "exp_avg": first, "exp_avg_sq": second}
        groups = torch.optim.Optimizer.state_dict(self)["param_groups"]
        return {"state": state, "param_groups": groups}

    def load_full_state_dict(self, state_dict: dict) -> None:
        """Load a single-device-format state dict (from any world size); each rank keeps its shard."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"load_full_state_dict: {len(saved_groups)} saved param groups != "
                             f"{len(self.param_groups)} in this optimizer")
        for group, saved in zip(self.param_groups, saved_groups):
            group.update({k: v for k, v in saved.items() if k not in ("params", "param_names")})
        lo, _ = self.layout.shard(self.rank)
        state = state_dict["state"]
        for i in range(len(self._params)):
            entry = state.get(i, state.get(str(i), {}))
            if "step" in entry:
                self._steps[i] = float(entry["step"])
        for pc, a, b in self._mine:
            entry = state.get(pc.param, state.get(str(pc.param), {}))
            src = slice(pc.start + a - pc.offset, pc.start + b - pc.offset)
            first = entry.get("momentum_buffer", entry.get("exp_avg"))
            if first is not None:
                self._first[a - lo:b - lo] = to_block_order(first, self._specs[pc.param])[src].to(self._first)
            if "exp_avg_sq" in entry:
                self._second[a - lo:b - lo] = entry["exp_avg_sq"].reshape(-1)[src].to(self._second)
