"""On CUDA: Newton–Schulz in bf16 against fp32 and float64 on the bench shapes (bench/newton_schulz.py), against
torch.optim.Muon's own iteration, batched vs one matrix at a time, the Gram variant and the in-place input; and one
whole Muon + AdamW optimizer step on CUDA against the CPU. Skipped without CUDA; bench/gpu_suite.sh runs them."""
from __future__ import annotations

import pytest
import torch
from gpu_helpers import BF16_TOL, CUDA, FP32_TOL, NS_BF16_TOL, exact_fp32_matmuls, randn, rel_err  # noqa: F401

from components.model.config import get_preset
from components.model.transformer import build_model
from components.optim.newton_schulz import QUINTIC, newton_schulz
from components.optim.routing import build_muon

pytestmark = pytest.mark.gpu

SHAPES = [(512, 512), (1024, 1024), (1024, 4096), (2048, 2048), (16, 256, 512), (4096, 1024)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bf16_on_cuda_stays_near_fp32_and_float64(shape):
    """Measured on this CPU: bf16 vs float64 0.9-1.2e-2 on these shapes; fp32 vs float64 under 1e-4."""
    g = randn(*shape, seed=sum(shape))
    reference = newton_schulz(g.double().cpu(), dtype=torch.float64)
    fp32 = newton_schulz(g, dtype=torch.float32)
    bf16 = newton_schulz(g, dtype=torch.bfloat16, out_dtype=torch.float32)
    assert fp32.dtype == bf16.dtype == torch.float32 and bf16.shape == g.shape
    assert rel_err(fp32, reference) < 2e-4  # 5 steps amplify fp32 rounding (9e-5 measured on 1024x4096)
    assert rel_err(bf16, reference) < NS_BF16_TOL and rel_err(bf16, fp32) < NS_BF16_TOL


@pytest.mark.parametrize("shape", [(1024, 4096), (16, 256, 512)], ids=lambda s: "x".join(map(str, s)))
def test_bf16_singular_values_land_in_the_quintic_band(shape):
    """Keller's quintic lands every singular value of a well-conditioned matrix in about [0.7, 1.2]."""
    s = torch.linalg.svdvals(newton_schulz(randn(*shape, seed=1), out_dtype=torch.float32).double())
    assert s.min() > 0.6 and s.max() < 1.25, (s.min().item(), s.max().item())


@pytest.mark.parametrize("shape", SHAPES[:5], ids=lambda s: "x".join(map(str, s)))
def test_ours_matches_torch_optim_muons_iteration_on_cuda(shape):
    """Same quintic, same bf16, same normalization: identical on the CPU; on CUDA the kernels (baddbmm vs
    matmul) may round differently."""
    from torch.optim._muon import (
        _zeropower_via_newtonschulz as torch_ns,  # private: its absence fails this test only
    )

    g = randn(*shape, seed=2 + sum(shape))
    ours = newton_schulz(g, 5, "quintic", torch.bfloat16, out_dtype=torch.bfloat16)
    mats = g if g.ndim == 2 else g.unbind(0)
    theirs = torch_ns(g, QUINTIC.triples[0], 5, 1e-7) if g.ndim == 2 else \
        torch.stack([torch_ns(m, QUINTIC.triples[0], 5, 1e-7) for m in mats])
    assert ours.dtype == theirs.dtype == torch.bfloat16
    assert rel_err(ours, theirs) < NS_BF16_TOL  # two bf16 NS runs, each ~1e-2 from float64, rounding apart


def test_batched_stack_equals_one_matrix_at_a_time_on_cuda():
    g = randn(16, 256, 512, seed=3)
    batched = newton_schulz(g, dtype=torch.float32)
    looped = torch.stack([newton_schulz(m, dtype=torch.float32) for m in g])
    assert rel_err(batched, looped) < FP32_TOL
    batched = newton_schulz(g, out_dtype=torch.float32)
    looped = torch.stack([newton_schulz(m, out_dtype=torch.float32) for m in g])
    assert rel_err(batched, looped) < NS_BF16_TOL  # cuBLAS's batched and single kernels round differently


@pytest.mark.parametrize("shape", [(1024, 4096), (4096, 1024), (16, 128, 512)], ids=lambda s: "x".join(map(str, s)))
def test_gram_iteration_is_the_same_polynomial_on_cuda(shape):
    g = randn(*shape, seed=4)
    standard = newton_schulz(g, dtype=torch.float32)
    gram = newton_schulz(g, dtype=torch.float32, method="gram")
    assert rel_err(gram, standard) < 2e-5  # 1.5e-6 measured on this CPU
    reference = newton_schulz(g.double().cpu(), dtype=torch.float64)
    assert rel_err(newton_schulz(g, method="gram", out_dtype=torch.float32), reference) < 0.05  # CPU test's bound


def test_overwrite_input_gives_the_same_numbers_on_cuda():
    g = randn(16, 256, 512, seed=5)
    expected = newton_schulz(g)
    x = g.to(torch.bfloat16).contiguous()
    before = x.clone()
    assert torch.equal(newton_schulz(x, overwrite_input=True), expected)
    assert not torch.equal(x, before)


@pytest.mark.parametrize("ns_dtype,tol", [("float32", 1e-4), ("bfloat16", 3e-2)])
def test_one_muon_adamw_step_on_cuda_matches_the_cpu(ns_dtype, tol):
    """The whole optimizer (routing, Nesterov momentum, batched NS over the expert stacks, the update scale,
    AdamW for embeddings, head and norms) on the tiny model's parameters with the same gradients: the change
    each step makes to every parameter agrees with the CPU's."""
    deltas = {}
    for device in ("cpu", CUDA):
        model = build_model(get_preset("tiny"), device="cpu", seed=0).to(device)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        for i, (_, p) in enumerate(model.named_parameters()):
            p.grad = randn(*p.shape, seed=100 + i, scale=1e-2, device=device)
        opt = build_muon(model, lr=1e-2, weight_decay=0.1, ns_dtype=ns_dtype)
        for _ in range(2):  # the second step reads the momentum and AdamW state the first one wrote
            opt.step()
        deltas[str(device)] = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    cpu, cuda = deltas["cpu"], deltas[str(CUDA)]
    errors = {n: rel_err(cuda[n], cpu[n]) for n in cpu}
    assert max(errors.values()) < tol, sorted(errors.items(), key=lambda kv: -kv[1])[:5]


def test_ns_seconds_is_the_gpus_time_not_the_launches():
    """The optimizer's `ns_seconds` on CUDA times NS between CUDA events: at least half of NS's synchronized wall
    time on the same matrix (a host clock around the launches reads a few hundred microseconds of ~ms of work)."""
    import time

    from components.optim.muon import Muon

    p = torch.nn.Parameter(randn(4096, 4096, seed=6))
    p.grad = randn(4096, 4096, seed=7)
    opt = Muon([{"params": [p], "algorithm": "muon", "name": "hidden"}], lr=1e-3)
    opt.step()  # warm-up: cuBLAS handles, state
    opt.step()
    reported = opt.last_stats["ns_seconds"]
    walls = []
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        newton_schulz(p.grad)
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - start)
    assert reported >= 0.5 * min(walls), (reported, walls)
    assert reported <= 3 * max(walls) + 1e-3, (reported, walls)
