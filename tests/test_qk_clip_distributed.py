"""QK-clip and per-head Muon are exact in the distributed paths the strategies use: ZeRO-1 (`ZeroOneMuon`, muon_ddp;
flat and owner partitions) and FSDP2 (`DTensorMuon` on `fully_shard`ed decoder layers, muon_fsdp), 2 and 4 real
gloo processes.

3 heads: q_proj / q_b_proj have 18 rows, kv_b_proj 24 (head blocks of 6 and 8 rows), so Shard(0) blocks of 9 or
5 rows and of 12 or 6 rows cut through heads. Every step tracks the max logits on each rank's share of the batch,
all-reduces them (MAX), steps and clips; after 5 steps the weights equal one process's within 1e-6.

In float64 weights, optimizer and NS, at lr 5e-3: what is compared is the algorithm, not rounding. The batch split
changes the averaged gradient by an ulp, and this tiny model with its saturated hot heads magnifies that: in float32
the weights differ by ~1.4e-6 after two steps with or without the clip, and in float64 (the fused loss and the
norms keep float32 parts) by up to 3e-6 after five steps at lr 0.02 without the clip (measured).
"""
from __future__ import annotations

import pytest
import qk_clip_helpers as qh
import torch
from dist_helpers_optim import launch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from components.optim.qk_clip import QKClip
from components.optim.routing import build_muon
from components.optim.zero1 import ZeroOneMuon

pytestmark = pytest.mark.distributed
SETTINGS = dict(lr=0.005, weight_decay=0.1, ns_dtype=torch.float64, telemetry=False)  # its sums are fp32
STEPS = 5
TOL = 1e-6
VARIANTS = [(granularity, q_lora_rank) for granularity in ("matrix", "head") for q_lora_rank in (None, 5)]


def _train(model, opt, rank: int = 0, world: int = 1) -> list[list[int]]:
    clip, counts = QKClip(qh.TAU), []
    for step in range(STEPS):
        ids, targets = qh.local_batch(step, rank, world) if world > 1 else qh.batch(step)
        counts.append(qh.clipped_step(model, opt, clip, ids, targets).tolist())
    return counts


@pytest.fixture(scope="module")
def single_device():
    """{(granularity, q_lora_rank): (weights, heads clipped per step, optimizer state)} on one process."""
    out = {}
    for granularity, q_lora_rank in VARIANTS:
        model = qh.hot_model(q_lora_rank, dtype=torch.float64)
        opt = build_muon(model, muon_granularity=granularity, **SETTINGS)
        counts = _train(model, opt)
        out[granularity, q_lora_rank] = ({n: p.detach().clone() for n, p in model.named_parameters()}, counts,
                                         opt.state_dict())
    return out


def _both_strategies(rank, world, out):
    results = {}
    for granularity, q_lora_rank in VARIANTS:
        for partition in ("flat", "owner"):  # Algorithm 1's flat buffer, or whole matrices per rank
            model = qh.hot_model(q_lora_rank, dtype=torch.float64)
            opt = build_muon(model, optimizer_cls=ZeroOneMuon, partition=partition, muon_granularity=granularity,
                             **SETTINGS)
            counts = _train(model, opt, rank, world)
            state = opt.full_state_dict()
            results[f"zero1-{partition}", granularity, q_lora_rank] = (
                {n: p.detach() for n, p in model.named_parameters()}, counts, state)
        model = qh.hot_model(q_lora_rank, dtype=torch.float64)
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:  # as MuonFSDPStrategy.parallelize does
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = build_muon(model, muon_granularity=granularity, **SETTINGS)
        assert type(opt).__name__ == "DTensorMuon"
        counts = _train(model, opt, rank, world)
        results["fsdp", granularity, q_lora_rank] = (
            {n: p.full_tensor().detach() for n, p in model.named_parameters()}, counts, None)
    if rank == 0:
        torch.save(results, out / "results.pt")


@pytest.mark.parametrize("world", [2, 4])
def test_clipped_training_distributed_equals_one_process(world, single_device, tmp_path):
    launch(_both_strategies, world, tmp_path)
    results = torch.load(tmp_path / "results.pt", weights_only=False)
    for (strategy, granularity, q_lora_rank), (weights, counts, state) in results.items():
        want, want_counts, want_state = single_device[granularity, q_lora_rank]
        where = f"{strategy} {granularity} q_lora_rank={q_lora_rank}"
        assert counts == want_counts, where
        assert counts[0] == [2, 2] and sum(map(sum, counts[1:])) > 0, (where, counts)  # later steps clip too
        for name, value in want.items():
            diff = float((weights[name] - value).abs().max())
            assert diff <= TOL, f"{where} {name}: max |diff| {diff:.3g} > {TOL}"
        if state is not None:  # ZeRO-1's consolidated momentum is the single-device one, in the parameters' layout
            for i, entry in want_state["state"].items():  # (a gradient sum: the batch split's rounding shows more)
                if "momentum_buffer" in entry:
                    diff = float((state["state"][i]["momentum_buffer"] - entry["momentum_buffer"]).abs().max())
                    assert diff <= 1e-5, f"{where} momentum of parameter {i}: {diff:.3g} > 1e-5"
