"""Distributed Muon equals single-device Muon: ZeRO-1 (Algorithm 1) and FSDP2/DTensor, 2 and 4 gloo processes.

The toy model has matrices whose dimensions 2 and 4 do not divide, a 3-expert stack whose expert 2 never gets a
token, and a matrix that never gets a gradient. Every process computes its share of the same global batch.
"""
import copy

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from dist_helpers_optim import ToyMoE, batch, launch, local_batch
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard

from components.optim.dtensor import DTensorMuon
from components.optim.muon import Muon
from components.optim.routing import build_muon
from components.optim.zero1 import ZeroOneMuon

pytestmark = pytest.mark.distributed
SETTINGS = dict(lr=0.05, weight_decay=0.1, ns_dtype=torch.float32)
TOL = 1e-6


def _train(model, opt, steps, rank=0, world=1, start=0):
    for s in range(start, start + steps):
        ids, targets = local_batch(s, rank, world) if world > 1 else batch(s)
        model(ids, targets).backward()
        opt.step()
        opt.zero_grad()


@pytest.fixture(scope="module")
def single_device():
    """Parameters after 3 and 5 steps and the optimizer state after 3 and 5 steps, on one process."""
    model = ToyMoE()
    opt = build_muon(model, **SETTINGS)
    _train(model, opt, 3)
    at3 = {n: p.detach().clone() for n, p in model.named_parameters()}
    state3 = copy.deepcopy(opt.state_dict())
    _train(model, opt, 2, start=3)
    return {"params3": at3, "state3": state3, "params5": {n: p.detach().clone() for n, p in model.named_parameters()},
            "state5": copy.deepcopy(opt.state_dict()), "initial": {n: p.detach().clone() for n, p in ToyMoE().named_parameters()}}


def _assert_params_close(got: dict, want: dict, atol=TOL):
    for name, value in want.items():
        diff = float((got[name] - value).abs().max())
        assert diff <= atol, f"{name}: max |diff| {diff:.3g} > {atol}"


def _assert_state_close(got: dict, want: dict):
    assert set(got["state"]) == set(want["state"])
    for i, entry in want["state"].items():
        for key, value in entry.items():
            diff = float((got["state"][i][key].double() - value.double()).abs().max())
            assert diff <= TOL, f"state[{i}][{key}] differs by {diff:.3g}"
    for g_got, g_want in zip(got["param_groups"], want["param_groups"]):
        assert g_got == g_want


# ------------------------------------------------------------------------------------------------ ZeRO-1
def _zero1_run(rank, world, partition, out):
    model = ToyMoE()
    opt = build_muon(model, optimizer_cls=ZeroOneMuon, partition=partition, **SETTINGS)
    _train(model, opt, 3, rank, world)
    params3 = {n: p.detach().clone() for n, p in model.named_parameters()}
    full3 = opt.full_state_dict()
    torch.save(opt.state_dict(), out / f"shard3_rank{rank}.pt")
    _train(model, opt, 2, rank, world, start=3)
    full5 = opt.full_state_dict(rank0_only=True)
    expected = opt.expected_comm_bytes()
    torch.save({"comm": opt.comm_bytes, "expected": expected}, out / f"comm_rank{rank}.pt")
    if rank == 0:
        torch.save({"params3_state": full3, "state5": full5, "model5": dict(model.named_parameters()),
                    "model3": params3}, out / "result.pt")


@pytest.mark.parametrize(("world", "partition"), [(2, "flat"), (4, "flat"), (4, "owner")])
def test_zero1_equals_single_device_and_counts_its_bytes(world, partition, single_device, tmp_path):
    launch(_zero1_run, world, partition, tmp_path)
    result = torch.load(tmp_path / "result.pt", weights_only=False)
    _assert_params_close({n: p.detach() for n, p in result["model5"].items()}, single_device["params5"])
    _assert_state_close(result["params3_state"], single_device["state3"])
    _assert_state_close(result["state5"], single_device["state5"])
    initial, final = single_device["initial"], result["model5"]
    assert torch.equal(final["unused"].detach(), initial["unused"])  # never had a gradient
    assert torch.equal(final["experts"].detach()[2], initial["experts"][2])  # expert 2 never got a token
    for rank in range(world):
        counted = torch.load(tmp_path / f"comm_rank{rank}.pt")
        assert counted["comm"] == counted["expected"], rank
    if partition == "owner":
        assert all("gather_boundary_matrices" not in torch.load(tmp_path / f"comm_rank{r}.pt")["comm"]
                   for r in range(world))


def _zero1_resume(rank, world, source, out, same_world):
    model = ToyMoE()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(source["params3"][name])
    opt = build_muon(model, optimizer_cls=ZeroOneMuon, partition="flat", **SETTINGS)
    if same_world:
        other = torch.load(out / f"shard3_rank{(rank + 1) % world}.pt", weights_only=False)
        try:
            opt.load_state_dict(other)
            raise AssertionError("loading another rank's shard must fail")
        except ValueError as exc:
            assert "each rank loads its own shard" in str(exc)
        opt.load_state_dict(torch.load(out / f"shard3_rank{rank}.pt", weights_only=False))
    else:
        opt.load_full_state_dict(source["state3"])
    _train(model, opt, 2, rank, world, start=3)
    if rank == 0:
        torch.save({n: p.detach() for n, p in model.named_parameters()}, out / f"resumed_{world}.pt")


def test_zero1_resume_same_and_different_world_size(single_device, tmp_path):
    launch(_zero1_run, 2, "flat", tmp_path)
    run = torch.load(tmp_path / "result.pt", weights_only=False)
    # A consolidated (single-device format) state saved by 2 processes, resumed by 4.
    launch(_zero1_resume, 4, {"params3": run["model3"], "state3": run["params3_state"]}, tmp_path, False)
    _assert_params_close(torch.load(tmp_path / "resumed_4.pt"), single_device["params5"])
    # Per-rank shards, same world size: bit for bit the uninterrupted run.
    launch(_zero1_resume, 2, {"params3": run["model3"], "state3": None}, tmp_path, True)
    resumed = torch.load(tmp_path / "resumed_2.pt")
    assert all(torch.equal(resumed[n], p.detach()) for n, p in run["model5"].items())


def _zero1_nonfinite(rank, world, out):
    model = ToyMoE(seed=rank)  # different on each rank until broadcast
    opt = build_muon(model, optimizer_cls=ZeroOneMuon, **SETTINGS)
    opt.broadcast_parameters()
    reference = ToyMoE(seed=0)
    same = all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))
    ids, targets = local_batch(0, rank, world)
    model(ids, targets).backward()
    if rank == 1:
        model.w2.grad[0, 0] = float("inf")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    unchanged = all(torch.equal(before[n], p) for n, p in model.named_parameters())
    flags = torch.tensor([float(unchanged), opt.last_stats["skipped_steps"], float(same)])
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    if rank == 0:
        torch.save(flags, out / "flags.pt")


def test_zero1_broadcast_and_nonfinite_gradient_on_one_rank_skips_the_step_everywhere(tmp_path):
    launch(_zero1_nonfinite, 2, tmp_path)
    assert torch.load(tmp_path / "flags.pt").tolist() == [1.0, 1.0, 1.0]


# ------------------------------------------------------------------------------------------------ FSDP2
def _fsdp_model(world):
    model = ToyMoE()
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    return model


def _fsdp_run(rank, world, out, steps, save_at, load):
    model = _fsdp_model(world)
    opt = build_muon(model, **SETTINGS)
    start = 0
    if load:
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(out / "dcp"))
        set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
        start = save_at
    _train(model, opt, steps, rank, world, start=start)
    if save_at is not None and not load:
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(out / "dcp"))
    buf = opt.state[model.experts]["momentum_buffer"]
    placement_ok = isinstance(buf, DTensor) and tuple(buf.placements) == (Shard(0),)
    full = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
    if rank == 0:
        torch.save({"params": full, "placement_ok": placement_ok, "comm": opt.comm_bytes}, out / "fsdp.pt")


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp2_equals_single_device(world, single_device, tmp_path):
    launch(_fsdp_run, world, tmp_path, 5, None, False)
    result = torch.load(tmp_path / "fsdp.pt", weights_only=False)
    _assert_params_close(result["params"], single_device["params5"])
    assert result["placement_ok"]
    assert result["comm"]["gather_matrices_to_owner"] > 0
    assert torch.equal(result["params"]["experts"][2], single_device["initial"]["experts"][2])


@pytest.mark.parametrize(("save_world", "load_world"), [(2, 2), (4, 2)])
def test_fsdp2_dcp_resume_in_a_fresh_process_group(save_world, load_world, single_device, tmp_path):
    launch(_fsdp_run, save_world, tmp_path, 3, 3, False)
    _assert_params_close(torch.load(tmp_path / "fsdp.pt", weights_only=False)["params"], single_device["params3"])
    launch(_fsdp_run, load_world, tmp_path, 2, 3, True)  # DCP reshards the DTensor optimizer state
    resumed = torch.load(tmp_path / "fsdp.pt", weights_only=False)["params"]
    _assert_params_close(resumed, single_device["params5"])
    if save_world == load_world:  # same layout: bit for bit the uninterrupted run
        launch(_fsdp_run, save_world, tmp_path, 5, None, False)
        uninterrupted = torch.load(tmp_path / "fsdp.pt", weights_only=False)["params"]
        assert all(torch.equal(resumed[n], p) for n, p in uninterrupted.items())


def _fsdp_construction_and_nonfinite(rank, world, out):
    model = _fsdp_model(world)
    opt = build_muon(model, **SETTINGS)
    errors = []
    for build in (lambda: build_muon(model, optimizer_cls=Muon, **SETTINGS),
                  lambda: DTensorMuon([ToyMoE().w1], **SETTINGS)):
        try:
            build()
        except ValueError as exc:
            errors.append(str(exc))
    owners = [None] * world
    dist.all_gather_object(owners, [opt.owners[p] for p in (model.w1, model.w2, model.unused)])
    ids, targets = local_batch(0, rank, world)
    model(ids, targets).backward()
    if rank == world - 1:  # this rank holds expert 2 (no tokens, zero gradient): make it non-finite here only
        model.experts.grad._local_tensor[-1, 0, 0] = float("nan")
    before = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
    opt.step()
    unchanged = all(torch.equal(before[n], p.full_tensor()) for n, p in model.named_parameters())
    if rank == 0:
        torch.save({"type": type(opt).__name__, "errors": errors, "owners": owners, "unchanged": unchanged,
                    "skipped": opt.last_stats["skipped_steps"]}, out / "construction.pt")


def test_fsdp2_variant_is_chosen_at_construction_and_a_nonfinite_shard_skips_the_step_everywhere(tmp_path):
    launch(_fsdp_construction_and_nonfinite, 2, tmp_path)
    result = torch.load(tmp_path / "construction.pt")
    assert result["type"] == "DTensorMuon"
    assert "'w1' is a DTensor (FSDP2); use DTensorMuon" in result["errors"][0]
    assert "every parameter must be a DTensor placed (Shard(0),), got 'param #0 of the group': Parameter" \
        in result["errors"][1]
    assert result["owners"][0] == result["owners"][1]  # every rank plans the same owners
    assert result["unchanged"] and result["skipped"] == 1


# ------------------------------------------------------------------------------------------------ update_norm
def _update_norm_both_paths(rank, world, out):
    settings = dict(SETTINGS, scale_mode="update_norm")
    zero1_model = ToyMoE()
    _train(zero1_model, build_muon(zero1_model, optimizer_cls=ZeroOneMuon, **settings), 3, rank, world)
    fsdp_model = _fsdp_model(world)
    _train(fsdp_model, build_muon(fsdp_model, **settings), 3, rank, world)
    full = {n: p.full_tensor().detach() for n, p in fsdp_model.named_parameters()}
    if rank == 0:
        torch.save({"zero1": {n: p.detach() for n, p in zero1_model.named_parameters()}, "fsdp": full},
                   out / "update_norm.pt")


def test_update_norm_scale_mode_distributed_equals_single_device(tmp_path):
    """Per-matrix scales 0.2/RMS(O) need the whole O: owners apply them before scattering (FSDP2)."""
    model = ToyMoE()
    _train(model, build_muon(model, **dict(SETTINGS, scale_mode="update_norm")), 3)
    want = {n: p.detach() for n, p in model.named_parameters()}
    launch(_update_norm_both_paths, 2, tmp_path)
    result = torch.load(tmp_path / "update_norm.pt")
    _assert_params_close(result["zero1"], want)
    _assert_params_close(result["fsdp"], want)
