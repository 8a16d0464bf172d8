"""Collectives that count what they send: bytes per collective for the last step and in total.

Counting follows the ring model of `zero1_layout.sent_bytes` (what one rank sends); all-to-all counts exactly the
bytes sent to other ranks. Uneven all-to-all splits are fine on gloo; uneven all_gather is not, so every gather
here uses equal-sized (padded) buffers.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from components.optim.zero1_layout import sent_bytes

_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class CountingComm:
    def __init__(self, process_group=None):
        self.group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        self.last: dict[str, int] = {}
        self.total: dict[str, int] = {}

    def new_step(self) -> None:
        self.last = {}

    def count(self, key: str, nbytes: int) -> None:
        self.last[key] = self.last.get(key, 0) + nbytes
        self.total[key] = self.total.get(key, 0) + nbytes

    def reduce_scatter_avg(self, key: str, out: torch.Tensor, inp: torch.Tensor) -> None:
        _reduce_scatter(out, inp, op=dist.ReduceOp.AVG, group=self.group)
        self.count(key, sent_bytes("reduce_scatter", inp.numel() * inp.element_size(), self.world_size))

    def all_gather(self, key: str | None, out: torch.Tensor, inp: torch.Tensor) -> None:
        _all_gather(out, inp, group=self.group)
        if key:
            self.count(key, sent_bytes("all_gather", out.numel() * out.element_size(), self.world_size))

    def all_reduce(self, key: str, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> None:
        dist.all_reduce(tensor, op=op, group=self.group)
        self.count(key, sent_bytes("all_reduce", tensor.numel() * tensor.element_size(), self.world_size))

    def all_to_all(self, key: str, send: list[torch.Tensor], recv_sizes: list[int], dtype: torch.dtype,
                   device: torch.device) -> list[torch.Tensor]:
        """Send send[r] (1-D) to rank r; receive recv_sizes[r] elements from rank r."""
        inp = torch.cat(send) if send else torch.zeros(0, dtype=dtype, device=device)
        out = torch.empty(sum(recv_sizes), dtype=dtype, device=device)
        dist.all_to_all_single(out, inp.to(dtype), recv_sizes, [t.numel() for t in send], group=self.group)
        self.count(key, sum(t.numel() for r, t in enumerate(send) if r != self.rank) * out.element_size())
        return list(out.split(recv_sizes))
