"""Bytes per optimizer step and rank: ZeRO-1 Distributed Muon (Moonlight Algorithm 1) vs ZeRO-1 AdamW.

Counted from the same layout code the optimizer runs (`zero1_layout.plan_layout` + `step_bytes`), for the `small`
preset's parameters (built on the meta device) at world sizes 2, 4 and 8, fp32 gradients and parameters, bf16
Newton–Schulz inputs for the boundary gather. Ring model: reduce-scatter and all-gather send (P−1)/P of the buffer.
Then the analytic counts are checked against the counters of real gloo runs (`ZeroOneMuon.comm.last`) at 2 and 4
processes on the `tiny` preset (--measure-preset small works too, with ~5 GB per process).
The paper's bound for gathering every matrix in bf16 is (4 + 2 + 4) / (4 + 4) = 1.25 (§2.3).
Last line: `comm_ratio_vs_zero1_adamw: X`, the largest ratio (max over ranks) of the default 'flat' partition.
Usage: python -m bench.muon_comm [--preset small] [--measure-preset tiny]
"""
from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from components.model.config import get_preset
from components.model.transformer import build_model
from components.optim.routing import build_muon, route_parameters
from components.optim.zero1 import ZeroOneMuon
from components.optim.zero1_layout import ParamInfo, code_count, plan_layout, zero1_adamw_bytes

WORLD_SIZES = (2, 4, 8)


def param_infos(model) -> list[ParamInfo]:
    """In the order `build_muon` puts parameters into groups (muon group first, then adamw)."""
    routes = route_parameters(model)
    named = list(model.named_parameters())
    ordered = [(n, p) for n, p in named if routes[n] == "muon"] + [(n, p) for n, p in named if routes[n] != "muon"]
    return [ParamInfo(i, tuple(p.shape), routes[n]) for i, (n, p) in enumerate(ordered)]


def analytic(infos: list[ParamInfo], world: int, partition: str) -> tuple[int, int]:
    layout = plan_layout(infos, world, partition)
    per_rank = [sum(layout.step_bytes(r, 4, 4, 2, code_count(infos), telemetry_keys=2).values())
                for r in range(world)]
    return max(per_rank), sum(per_rank) // world


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _measure(rank: int, world: int, port: int, preset: str, partition: str, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = build_model(get_preset(preset), seed=0)
    gen = torch.Generator().manual_seed(rank)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    opt = build_muon(model, lr=1e-3, optimizer_cls=ZeroOneMuon, partition=partition, ns_steps=1)
    opt.step()
    queue.put((rank, opt.comm_bytes, opt.expected_comm_bytes()))
    dist.barrier()
    dist.destroy_process_group()


def measured_matches(preset: str, world: int, partition: str) -> tuple[bool, int]:
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    mp.start_processes(_measure, args=(world, _free_port(), preset, partition, queue), nprocs=world,
                       start_method="fork")
    results = [queue.get() for _ in range(world)]
    return all(got == want for _, got, want in results), max(sum(got.values()) for _, got, _ in results)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--measure-preset", default="tiny")
    args = parser.parse_args(argv)
    infos = param_infos(build_model(get_preset(args.preset), device="meta"))
    numel = sum(p.numel for p in infos)
    print(f"preset={args.preset} params={numel:,} codes/step={code_count(infos):,}")
    print(f"{'world':>5} {'partition':>9} {'muon MB/rank (max)':>19} {'mean':>10} {'ZeRO-1 AdamW MB':>16} {'ratio':>7}")
    worst = 0.0
    for world in WORLD_SIZES:
        adamw = zero1_adamw_bytes(numel, world)
        for partition in ("flat", "owner"):
            most, mean = analytic(infos, world, partition)
            ratio = most / adamw
            if partition == "flat":
                worst = max(worst, ratio)
            print(f"{world:>5} {partition:>9} {most / 1e6:>19.3f} {mean / 1e6:>10.3f} {adamw / 1e6:>16.3f} {ratio:>7.4f}")
    print(f"paper's bound when every matrix is gathered in bf16: {10 / 8:.2f}")
    for world in (2, 4):
        for partition in ("flat", "owner"):
            ok, most = measured_matches(args.measure_preset, world, partition)
            print(f"measured counters == analytic ({args.measure_preset}, world {world}, {partition}): {ok} "
                  f"(max {most:,} bytes/rank)")
    print(f"comm_ratio_vs_zero1_adamw: {worst:.4f}")


if __name__ == "__main__":
    main()
