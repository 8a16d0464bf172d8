"""On CUDA: the fused LM head + cross-entropy (components/model/fused_loss.py) against F.cross_entropy over the
full logits, at the `small` preset's head (hidden 768, vocab 32768), in fp32 and under bf16 autocast, and its
memory: it never holds the [tokens, vocab] logits. Skipped without CUDA; bench/gpu_suite.sh runs them."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gpu_helpers import BF16_TOL, CUDA, FP32_TOL, exact_fp32_matmuls, randn, rel_err  # noqa: F401

from components.model.fused_loss import linear_cross_entropy

pytestmark = pytest.mark.gpu

TOKENS, HIDDEN, VOCAB = 4096, 768, 32768


def _inputs(seed: int):
    x = randn(TOKENS, HIDDEN, seed=seed).requires_grad_()
    w = randn(VOCAB, HIDDEN, seed=seed + 1, scale=0.05).requires_grad_()
    t = torch.randint(0, VOCAB, (TOKENS,), generator=torch.Generator().manual_seed(seed + 2)).to(CUDA)
    t[::7] = -100  # ignored positions, as SFT's masked prompts
    return x, w, t


def _unfused(x, w, t):
    return F.cross_entropy((x @ w.t()).float(), t, ignore_index=-100)


@pytest.mark.parametrize("chunk_elements", [None, 2**22])  # the accelerator default (one chunk here), 32 chunks
def test_fused_head_matches_cross_entropy_in_fp32(chunk_elements):
    x, w, t = _inputs(0)
    expected = _unfused(x, w, t)
    ex, ew = torch.autograd.grad(3.0 * expected, (x, w))
    got = linear_cross_entropy(x, w, t, chunk_elements=chunk_elements)
    gx, gw = torch.autograd.grad(3.0 * got, (x, w))
    assert abs(got.item() - expected.item()) / expected.item() < FP32_TOL
    assert rel_err(gx, ex) < FP32_TOL and rel_err(gw, ew) < FP32_TOL
    assert gx[::7].abs().max().item() == 0.0


def test_fused_head_under_bf16_autocast_matches_the_autocast_head():
    """Both compute the logits from bf16 operands (autocast's Linear; the fused function's own cast), so they
    agree to bf16 rounding, and both stay near the fp32 value; gradients come back in the parameters' fp32."""
    x, w, t = _inputs(1)
    reference = _unfused(x, w, t)
    rx, rw = torch.autograd.grad(reference, (x, w))
    with torch.autocast(CUDA.type, dtype=torch.bfloat16):
        expected = F.cross_entropy(F.linear(x, w).float(), t, ignore_index=-100)
        got = linear_cross_entropy(x, w, t)
    ex, ew = torch.autograd.grad(expected, (x, w))
    gx, gw = torch.autograd.grad(got, (x, w))
    assert gx.dtype == torch.float32 and gw.dtype == torch.float32
    assert abs(got.item() - expected.item()) / expected.item() < 1e-3
    assert abs(got.item() - reference.item()) / reference.item() < 1e-2
    errors = [rel_err(gx, ex), rel_err(gw, ew), rel_err(gx, rx), rel_err(gw, rw)]
    assert max(errors) < BF16_TOL, errors


def test_fused_head_never_holds_the_logits():
    """Peak memory above the inputs during forward+backward stays under half of one fp32 logits tensor
    (4096 x 32768 x 4 B = 512 MiB); the unfused head needs more than the logits themselves."""
    x, w, t = _inputs(2)
    logits_bytes = TOKENS * VOCAB * 4

    def peak_extra(fn) -> int:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(x, w, t).backward()
        torch.cuda.synchronize()
        x.grad = w.grad = None
        return torch.cuda.max_memory_allocated() - base

    fused = peak_extra(lambda *a: linear_cross_entropy(*a, chunk_elements=2**22))
    unfused = peak_extra(_unfused)
    assert fused < logits_bytes / 2 < logits_bytes < unfused, (fused, unfused)
