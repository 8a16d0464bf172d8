"""The CPU optimizer step runs its elementwise chains block by block (components/optim/update.py `blocks`): the
blocks cover every element exactly once, and a step in tiny blocks equals the unblocked step bitwise on one
device, and to the distributed tolerance over ZeRO-1 and FSDP2 (the forked gloo ranks inherit the block size)."""
from __future__ import annotations

import math

import pytest
import torch
from dist_helpers_optim import ToyMoE, batch, launch, local_batch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from components.optim import update
from components.optim.routing import build_muon
from components.optim.update import adamw_step, apply_orthogonal, blocks, momentum_step
from components.optim.zero1 import ZeroOneMuon

SETTINGS = dict(lr=0.05, weight_decay=0.1, ns_dtype=torch.float32)
TINY, WHOLE = 5, 1 << 30


def _covered_once(t: torch.Tensor, size: int) -> list[tuple]:
    """Add 1 through every block's view of a zero tensor; every element must end at exactly 1."""
    t.zero_()
    pieces = blocks(t, size=size)
    for (view,) in pieces:
        view.add_(1)
    assert torch.equal(t, torch.ones_like(t)), "blocks miss or repeat elements"
    return pieces


def test_blocks_cover_flat_transposed_and_stacked_tensors_exactly_once():
    pieces = _covered_once(torch.empty(23), 5)
    assert [p[0].numel() for p in pieces] == [5, 5, 5, 5, 3]
    transposed = torch.empty(3, 6, 7).mT  # [3, 7, 6] with the NS buffers' strides
    pieces = _covered_once(transposed, 12)
    assert len(pieces) == 3 * math.ceil(7 / 2) and all(p[0].shape[-1] == 6 and p[0].shape[0] <= 2 for p in pieces)
    _covered_once(torch.empty(2, 3, 4, 5), 7)  # [..., A, B] stacks of stacks
    assert len(_covered_once(torch.empty(4, 4), 100)) == 1  # small: the tensor itself
    assert len(blocks(torch.empty(100), size=None)) == 1  # None (CUDA): whole tensors


def test_blocks_pair_each_matrix_with_its_broadcast_values_and_pass_scalars_through():
    w = torch.zeros(3, 4, 5)
    keep = torch.tensor([True, False, True]).view(3, 1, 1)
    scale = torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1)
    for v, k, s, lr in blocks(w, keep, scale, 0.5, size=10):
        assert k.shape == (1, 1) and s.shape == (1, 1) and lr == 0.5
        v.add_(torch.where(k, 0.0, s))
    assert torch.equal(w[:, 0, 0], torch.tensor([0.0, 2.0, 0.0])) and torch.equal(w[1], torch.full((4, 5), 2.0))
    grad = torch.arange(12.0)
    for v, g, none in blocks(torch.zeros(12), grad, None, size=5):
        assert none is None and torch.equal(v + g, g)
    odd = torch.empty(4, 3, 6, 5).transpose(0, 1)  # not viewable as [N, A, B]: one block, no copy
    assert blocks(odd, size=4)[0][0] is odd


def _blocked_vs_whole(monkeypatch, fn, *tensors):
    """fn(*clones) with tiny blocks and with whole tensors; returns both sets of clones and both results."""
    results = []
    for size in (TINY * 20, WHOLE):
        monkeypatch.setattr(update, "BLOCK_ELEMENTS", size)
        clones = [t.clone() for t in tensors]
        results.append((clones, fn(*clones)))
    return results


@pytest.mark.parametrize(("w_dtype", "o_dtype"), [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                                  (torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("shape", [(3, 40, 30), (2500,)])
def test_apply_orthogonal_in_blocks_is_bitwise_whole_for_every_dtype_pair(w_dtype, o_dtype, shape, monkeypatch):
    """A narrower O is widened per block into W's dtype; a wider O (fp32 NS into bf16 W) is added as it is, so
    W(1 - lr wd) - lr s O is computed in the wider dtype and rounded once, as on whole tensors. bf16 op bf16 on
    CPU rounds the elements after a tensor's last full vector differently (measured: blocks of 100 moved 398 of 1M
    results by one unit in the last place; flat blocks of 2^18, a multiple of every vector width, none)."""
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(shape, generator=gen).to(w_dtype)
    o = torch.randn(shape[::-1], generator=gen).to(o_dtype)
    o = o.permute(*reversed(range(o.ndim)))  # strided, like the transposed NS output
    (blocked, sq_b), (whole, sq_w) = _blocked_vs_whole(
        monkeypatch, lambda w: apply_orthogonal(w, o, 0.3, 0.02, 0.1, squares=True), w)
    if w_dtype == torch.float32 or o_dtype == torch.float32:
        assert torch.equal(blocked[0], whole[0])
    else:
        ulp = torch.finfo(w_dtype).eps * whole[0].float().abs()
        assert bool(((blocked[0].float() - whole[0].float()).abs() <= ulp).all())
    torch.testing.assert_close(torch.stack(sq_b), torch.stack(sq_w), rtol=1e-5, atol=0)


def test_blocks_broadcast_any_keep_or_scale_shape_like_whole_tensors(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    w3, o3 = torch.randn(4, 30, 20, generator=gen), torch.randn(4, 30, 20, generator=gen)
    w1, o1 = torch.randn(700, generator=gen), torch.randn(700, generator=gen)
    cases = [(w3, o3, torch.tensor(0.5), torch.tensor([[False]])),  # 0-D scale, [1, 1] keep
             (w3, o3, torch.rand(4, 1, 20, generator=gen), torch.rand(4, 30, 1, generator=gen) < 0.5),  # per column/row
             (w3, o3, torch.rand(1, 1, 1, generator=gen), torch.tensor([True, False, True, False]).view(4, 1, 1)),
             (w1, o1, torch.tensor([2.0]), torch.tensor(False)),  # 1-D with [1] and 0-D
             (w1, o1, 1.5, torch.rand(700, generator=gen) < 0.3)]
    for w, o, scale, keep in cases:
        (blocked, _), (whole, _) = _blocked_vs_whole(
            monkeypatch, lambda w, o=o, s=scale, k=keep: apply_orthogonal(w, o, s, 0.02, 0.1, k), w)
        assert torch.equal(blocked[0], whole[0]), (w.shape, getattr(scale, "shape", scale), keep.shape)
        assert not torch.equal(blocked[0], w)
        (blocked, out_b), (whole, out_w) = _blocked_vs_whole(
            monkeypatch, lambda b, o=o, k=keep: momentum_step(b, o, 0.95, True, k), w)
        assert torch.equal(blocked[0], whole[0]) and torch.equal(out_b, out_w)


def test_momentum_step_returns_the_nesterov_input_in_the_promoted_dtype():
    buf, grad = torch.zeros(3, 4, dtype=torch.bfloat16), torch.ones(3, 4)
    assert momentum_step(buf, grad, 0.9, True).dtype == torch.float32
    assert momentum_step(buf, grad, 0.9, False).dtype == torch.bfloat16


def test_adamw_telemetry_of_low_precision_parameters_is_summed_in_float32():
    w = torch.full((1 << 18,), 200.0, dtype=torch.float16)  # Σw² = 1.05e10 > fp16's 65504
    zeros = [torch.zeros_like(w) for _ in range(2)]
    _, weight_sq = adamw_step([w], [torch.ones_like(w)], *([z] for z in zeros), [1.0], 0.0, 0.0, (0.9, 0.95), 1e-8,
                              want_update=True)
    assert weight_sq.dtype == torch.float32
    torch.testing.assert_close(weight_sq[0], torch.tensor(200.0 ** 2 * (1 << 18)), rtol=1e-3, atol=0)


def test_squares_with_kept_matrices_is_refused():
    w, o = torch.zeros(2, 3, 3), torch.ones(2, 3, 3)
    with pytest.raises(ValueError, match="squares=True needs keep=None"):
        apply_orthogonal(w, o, 1.0, 0.1, 0.0, keep=torch.ones(2, 1, 1, dtype=torch.bool), squares=True)


def test_adamw_telemetry_squares_equal_a_direct_computation(monkeypatch):
    monkeypatch.setattr(update, "BLOCK_ELEMENTS", TINY)
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(7, 6, generator=gen), torch.randn(13, generator=gen), torch.randn(2, generator=gen)]
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    m = [torch.randn(p.shape, generator=gen) * 0.1 for p in params]
    v = [torch.rand(p.shape, generator=gen) * 0.1 for p in params]
    steps, lr, wd, (b1, b2), eps = [3.0, 3.0, 1.0], 0.01, 0.1, (0.9, 0.95), 1e-8
    want_m = [mi + (g - mi) * (1 - b1) for mi, g in zip(m, grads)]
    want_v = [vi * b2 + g * g * (1 - b2) for vi, g in zip(v, grads)]
    want_u = [(mi / (1 - b1 ** s)) / ((vi / (1 - b2 ** s)).sqrt() + eps) for mi, vi, s in zip(want_m, want_v, steps)]
    want_w = [p * (1 - lr * wd) - lr * u for p, u in zip(params, want_u)]
    update_sq, weight_sq = adamw_step(params, grads, m, v, steps, lr, wd, (b1, b2), eps, want_update=True)
    for i in range(len(params)):
        torch.testing.assert_close(params[i], want_w[i], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(update_sq[i], want_u[i].square().sum(), rtol=1e-5, atol=0)
        torch.testing.assert_close(weight_sq[i], want_w[i].square().sum(), rtol=1e-5, atol=0)


def _train(model, opt, steps, rank=0, world=1):
    stats = []
    for s in range(steps):
        ids, targets = local_batch(s, rank, world) if world > 1 else batch(s)
        model(ids, targets).backward()
        opt.step()
        opt.zero_grad()
        stats.append(dict(opt.last_stats))
    return stats


def _single(monkeypatch, size, ns_dtype=torch.float32):
    monkeypatch.setattr(update, "BLOCK_ELEMENTS", size)
    model = ToyMoE()
    stats = _train(model, build_muon(model, **{**SETTINGS, "ns_dtype": ns_dtype}), 4)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, stats


@pytest.mark.parametrize("ns_dtype", [torch.float32, torch.bfloat16])  # bf16 O: blocks widened into a scratch
def test_tiny_blocks_equal_whole_tensors_bitwise_and_telemetry_to_reduction_order(ns_dtype, monkeypatch):
    whole, whole_stats = _single(monkeypatch, WHOLE, ns_dtype)
    tiny, tiny_stats = _single(monkeypatch, TINY, ns_dtype)
    for name, value in whole.items():
        assert torch.equal(tiny[name], value), name
    assert torch.equal(tiny["experts"][2], ToyMoE().experts.detach()[2])  # expert 2 never got a token
    rms = [k for k in whole_stats[-1] if k.endswith("_rms")]
    assert {k.split("/")[0] for k in rms} >= {"muon", "adamw"}, rms
    for got, want in zip(tiny_stats, whole_stats):
        for key in rms:
            assert got[key] == pytest.approx(want[key], rel=1e-5), key


def _distributed_run(rank, world, kind, out):
    assert update.BLOCK_ELEMENTS == TINY  # inherited through fork
    model = ToyMoE()
    if kind == "fsdp2":
        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
        opt = build_muon(model, **SETTINGS)
    else:
        opt = build_muon(model, optimizer_cls=ZeroOneMuon, partition="flat", **SETTINGS)
    stats = _train(model, opt, 4, rank, world)
    full = {n: (p.full_tensor() if kind == "fsdp2" else p).detach().clone() for n, p in model.named_parameters()}
    if rank == 0:
        torch.save({"params": full, "stats": stats}, out / "result.pt")


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["zero1", "fsdp2"])
def test_tiny_blocks_distributed_equal_whole_tensors_on_one_device(kind, monkeypatch, tmp_path):
    whole, whole_stats = _single(monkeypatch, WHOLE)
    monkeypatch.setattr(update, "BLOCK_ELEMENTS", TINY)
    launch(_distributed_run, 2, kind, tmp_path)
    result = torch.load(tmp_path / "result.pt", weights_only=False)
    for name, value in whole.items():
        diff = float((result["params"][name] - value).abs().max())
        assert diff <= 1e-6, f"{name}: max |diff| {diff:.3g}"
    for got, want in zip(result["stats"], whole_stats):
        for key in (k for k in want if k.endswith("_rms")):
            assert got[key] == pytest.approx(want[key], rel=1e-4), key
