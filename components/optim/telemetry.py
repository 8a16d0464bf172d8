"""Per-step optimizer telemetry: update RMS and weight RMS per parameter group, time in Newton–Schulz.

Sums are kept as tensors and read back once per step (one host sync, one small all-reduce when distributed).
NS time is wall time on the CPU; on CUDA it is the GPU's time between CUDA events around each NS call (a host
clock would measure only the kernel launches), read at the step's end.
Algorithm 1 of Moonlight returns sqrt(mean(u²)) for logging; with scale_mode='moonlight' it should sit near 0.2.
"""
from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist

from components.optim.update import block_size, blocks, square_sum


class StepStats:
    def __init__(self) -> None:
        self._sums: dict[str, list[torch.Tensor]] = {}
        self._counts: dict[str, list[float]] = {}
        self._ns_host_seconds = 0.0
        self._ns_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.reduced_bytes = 0  # payload of the telemetry all-reduce, for the communication counters

    @contextlib.contextmanager
    def timing_ns(self, device: torch.device):
        """Times the block into `ns_seconds`: CUDA events on a CUDA device, the host clock elsewhere."""
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._ns_events.append((start, end))
            return
        t0 = time.perf_counter()
        yield
        self._ns_host_seconds += time.perf_counter() - t0

    @property
    def ns_seconds(self) -> float:
        """Seconds in Newton–Schulz this step (on CUDA this waits for the last timed NS to finish)."""
        if self._ns_events:
            self._ns_events[-1][1].synchronize()
            self._ns_host_seconds += sum(a.elapsed_time(b) for a, b in self._ns_events) / 1000.0
            self._ns_events.clear()
        return self._ns_host_seconds

    def ensure(self, key: str, device: torch.device) -> None:
        """Register `key` even if this rank updates nothing in it (distributed reductions need equal layouts)."""
        self._sums.setdefault(key, [torch.zeros((), device=device)] * 2)
        self._counts.setdefault(key, [0.0, 0.0])

    def add(self, key: str, update: torch.Tensor, weight: torch.Tensor, scale: float | torch.Tensor = 1.0) -> None:
        """Accumulate ||scale·update||² and ||weight||² (scale: a number or one per matrix, broadcastable)."""
        size = block_size(update.device)  # a bf16 update is read in blocks: no whole-tensor fp32 copy on CPU
        update_sq = torch.stack([square_sum(u, s) for u, s in blocks(update, scale, size=size)]).sum()
        self.add_squares(key, update_sq, update.numel(), square_sum(weight), weight.numel())

    def add_squares(self, key: str, update_sq: torch.Tensor, update_numel: int, weight_sq: torch.Tensor,
                    weight_numel: int) -> None:
        """Accumulate sums already taken: ||update||² over `update_numel` elements, ||weight||² over `weight_numel`."""
        sums = self._sums.setdefault(key, [torch.zeros((), device=update_sq.device)] * 2)
        counts = self._counts.setdefault(key, [0.0, 0.0])
        sums[0] = sums[0] + update_sq.to(sums[0].device)
        sums[1] = sums[1] + weight_sq.to(sums[1].device)
        counts[0] += update_numel
        counts[1] += weight_numel

    def finish(self, process_group=None, distributed: bool = False, extra: dict | None = None) -> dict[str, float]:
        """Reduce (sum over ranks when `distributed`) and return {'<group>/update_rms', '<group>/weight_rms', ...}."""
        keys = sorted(self._sums)
        out: dict[str, float] = {}
        if keys:
            device = self._sums[keys[0]][0].device
            sums = torch.stack([s for k in keys for s in self._sums[k]]).double().cpu()
            counts = torch.tensor([c for k in keys for c in self._counts[k]], dtype=torch.float64)
            packed = torch.cat([sums, counts])
            if distributed:
                packed = packed.to(device if device.type != "meta" else "cpu")
                dist.all_reduce(packed, group=process_group)
                self.reduced_bytes = packed.numel() * packed.element_size()
                packed = packed.cpu()
            sums, counts = packed[: len(sums)], packed[len(sums):]
            for i, key in enumerate(keys):
                out[f"{key}/update_rms"] = float((sums[2 * i] / counts[2 * i].clamp(min=1)).sqrt())
                out[f"{key}/weight_rms"] = float((sums[2 * i + 1] / counts[2 * i + 1].clamp(min=1)).sqrt())
        out["ns_seconds"] = self.ns_seconds
        out.update(extra or {})
        return out
