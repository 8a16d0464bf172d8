"""The model's hand-written autograd pieces, apart from the modules that use them (as torchtitan keeps its
grouped-GEMM helpers in moe/utils): expert dispatch and combine as permutations of the (token, choice) slots, and
the experts' SwiGLU over expert-sorted rows (one matmul per expert segment, or torch._grouped_mm on CUDA sm90+).

They compute with `out=` and in-place matmuls, which autocast does not reach: callers hand them inputs already in
the compute dtype (`autocast_inputs`). `linear_cross_entropy` (fused_loss.py) is built the same way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Cast floating tensors to the autocast dtype when autocast is on for their device: hand-written autograd
    functions compute with `out=` and in-place matmuls, which autocast does not reach, so they take their inputs
    already in the compute dtype (as autocast would give a Linear)."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)


def no_grad_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under no_grad / inference_mode, detach: a Function's ctx.needs_input_grad still reports the parameters'
    requires_grad there, and these functions do their gradient work in forward."""
    return tensors if torch.is_grad_enabled() else tuple(t.detach() for t in tensors)


def dispatch_to_slots(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
    """xs[j] = x[order[j] // k]: each token [T, H] copied to its k slots in expert order ([T*k, H])."""
    return _Dispatch.apply(x, order, inverse, k)


def permute_rows(x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """x[perm] for a permutation `perm` whose inverse is `inverse`."""
    return _Permute.apply(x, perm, inverse)


def expert_swiglu(xs: torch.Tensor, counts: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                  down: torch.Tensor) -> torch.Tensor:
    """down_e(silu(gate_e(x)) · up_e(x)) for rows xs sorted by expert, counts[e] rows for expert e; weights are
    stacked [experts, out, in]."""
    if grouped_mm_supported(xs) and xs.shape[0] > 0:  # no rows at all (an empty micro-batch): the segment loop
        offs = counts.cumsum(0).to(torch.int32)
        a = torch._grouped_mm(xs, gate.transpose(-2, -1), offs=offs)
        u = torch._grouped_mm(xs, up.transpose(-2, -1), offs=offs)
        return torch._grouped_mm(F.silu(a) * u, down.transpose(-2, -1), offs=offs)
    sizes = counts.tolist()  # one host sync per layer; the loops run over experts, never over tokens
    return _SegmentFFN.apply(xs, gate, up, down, sizes)


def grouped_mm_supported(x: torch.Tensor) -> bool:
    """torch._grouped_mm needs CUDA (sm90+) and bf16; elsewhere the segment loop runs."""
    if not (x.is_cuda and hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16):
        return False
    return torch.cuda.get_device_capability(x.device)[0] >= 9


class _Dispatch(torch.autograd.Function):
    """xs[j] = x[order[j] // k]: each token copied to its k slots in expert order. Backward: gather the slot
    gradients back into (token, choice) order with the inverse permutation and sum over the k choices."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, order // k)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        slots, k = grad.shape[0], ctx.k
        return grad.index_select(0, inverse).view(slots // k, k, grad.shape[-1]).sum(1), None, None, None


class _Permute(torch.autograd.Function):
    """y = x[perm] for a permutation; backward gathers with the inverse (index_select's own backward would
    zero-fill and index_add)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class _SegmentFFN(torch.autograd.Function):
    """The experts' SwiGLU over expert-sorted rows, one matmul per expert segment, written into whole-batch
    buffers (no per-expert outputs to concatenate, no per-expert weight gradients to stack); the elementwise
    work runs once over all rows. Backward is written out by hand: one autograd node instead of about ten per
    expert."""

    @staticmethod
    def forward(ctx, xs, gate, up, down, sizes):
        rows = xs.shape[0]
        a = xs.new_empty(rows, gate.shape[1])
        u = xs.new_empty(rows, up.shape[1])
        spans = []
        start = 0
        for e, n in enumerate(sizes):
            if n:
                spans.append((e, start, start + n))
                torch.mm(xs[start:start + n], gate[e].t(), out=a[start:start + n])
                torch.mm(xs[start:start + n], up[e].t(), out=u[start:start + n])
            start += n
        h = F.silu(a).mul_(u)
        y = xs.new_empty(rows, down.shape[1])
        for e, lo, hi in spans:
            torch.mm(h[lo:hi], down[e].t(), out=y[lo:hi])
        ctx.save_for_backward(xs, gate, up, down, a, u)
        ctx.spans = spans
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        xs, gate, up, down, a, u = ctx.saved_tensors
        gy = gy.contiguous()
        # Few whole-batch temporaries: on CPU each fresh [rows, I] buffer costs page faults, not just arithmetic.
        sig = torch.sigmoid(a)
        silu = a * sig
        h = silu * u
        gh = torch.empty_like(a)
        g_down = torch.empty_like(down)
        for e, lo, hi in ctx.spans:
            torch.mm(gy[lo:hi], down[e], out=gh[lo:hi])
            torch.mm(gy[lo:hi].t(), h[lo:hi], out=g_down[e])
        g_u = h.copy_(gh).mul_(silu)  # h is no longer needed
        dsilu = torch.sub(1, sig).mul_(silu).add_(sig)  # d silu(a) / da = σ + silu (1 - σ)
        g_a = gh.mul_(u).mul_(dsilu)
        g_gate, g_up = torch.empty_like(gate), torch.empty_like(up)
        gx = torch.empty_like(xs)
        for e, lo, hi in ctx.spans:
            torch.mm(g_a[lo:hi].t(), xs[lo:hi], out=g_gate[e])
            torch.mm(g_u[lo:hi].t(), xs[lo:hi], out=g_up[e])
            torch.mm(g_a[lo:hi], gate[e], out=gx[lo:hi])
            gx[lo:hi].addmm_(g_u[lo:hi], up[e])
        used = {e for e, _, _ in ctx.spans}
        for e in range(gate.shape[0]):  # experts that received no token get zero gradients
            if e not in used:
                g_gate[e].zero_(), g_up[e].zero_(), g_down[e].zero_()
        return gx, g_gate, g_up, g_down, None
