"""The LM head and its cross-entropy in one autograd function, chunked over tokens, so training never holds the
[tokens, vocab] logits (`linear_cross_entropy`; the transformer's loss when it is given targets)."""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from components.model.kernels import autocast_inputs, no_grad_inputs


class _LinearCrossEntropy(torch.autograd.Function):
    """loss = mean cross-entropy of (x @ weightᵀ) over targets != ignore_index, in token chunks, without ever
    holding the [N, V] logits: each chunk's softmax - onehot is turned into its input and weight gradients right
    away (the same three matmuls an unfused head does), so backward only scales them by dloss / n_valid."""

    @staticmethod
    def forward(ctx, x, weight, targets, ignore_index: int, chunk: int):
        n = x.shape[0]
        valid = targets != ignore_index
        safe = torch.where(valid, targets, torch.zeros_like(targets))
        count = valid.sum()
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = x.new_zeros((), dtype=torch.float32)
        for start in range(0, n, chunk):
            rows = slice(start, min(n, start + chunk))
            logp = torch.log_softmax(x[rows] @ weight.t(), dim=-1, dtype=torch.float32)
            t, v = safe[rows, None], valid[rows]
            total -= (logp.gather(1, t).squeeze(1) * v).sum()
            if need_x or need_w:
                g = logp.exp_()
                g.scatter_add_(1, t, torch.full_like(t, -1, dtype=g.dtype))
                g.mul_(v[:, None].to(g.dtype))  # ignored rows get no gradient
                g = g.to(weight.dtype)  # the compute dtype (autocast_inputs cast x and weight to it)
                if need_x:
                    torch.mm(g, weight, out=grad_x[rows])
                if need_w:
                    if weight.dtype == torch.float32:
                        grad_w.addmm_(g.t(), x[rows])
                    else:  # a low-precision matmul, accumulated over chunks in fp32
                        grad_w.add_(g.t() @ x[rows])
        ctx.save_for_backward(count, grad_x, grad_w)
        ctx.weight_dtype, ctx.used = weight.dtype, False
        return total / count  # NaN when nothing is valid, as F.cross_entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        if ctx.used:
            raise RuntimeError("linear_cross_entropy: backward ran twice through the same graph "
                               "(retain_graph=True); compute the loss again instead")
        ctx.used = True
        count, grad_x, grad_w = ctx.saved_tensors
        scale = grad_loss / count.clamp(min=1)  # nothing valid: zero gradients, as F.cross_entropy
        gx = grad_x.mul_(scale.to(grad_x.dtype)) if grad_x is not None else None
        gw = grad_w.mul_(scale).to(ctx.weight_dtype) if grad_w is not None else None
        return gx, gw, None, None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         chunk_elements: int | None = None) -> torch.Tensor:
    """cross_entropy(x @ weightᵀ, targets) for x [N, H], weight [V, H], targets [N], never materializing the
    [N, V] logits. Memory: one chunk of `chunk_elements` fp32 logits at a time (default 2**22 on CPU, where large
    fresh allocations cost page faults, 2**28 on accelerators) plus the input and weight gradients, which are
    computed in forward and held until backward ([N, H], and [V, H] in fp32). Value and gradients match the
    unfused head to rounding. Under autocast the matmuls run in the autocast dtype (the log-softmax in fp32), as
    for a Linear head; under no_grad no gradient work is done."""
    if targets.dtype != torch.long:
        targets = targets.long()
    if chunk_elements is None:
        chunk_elements = 2**22 if x.device.type == "cpu" else 2**28
    n, vocab = x.shape[0], weight.shape[0]
    pieces = max(1, -(-n * vocab // chunk_elements))
    chunk = max(1, -(-n // pieces))
    x, weight = autocast_inputs(*no_grad_inputs(x, weight))
    with torch.autocast(x.device.type, enabled=False):
        return _LinearCrossEntropy.apply(x, weight, targets, ignore_index, chunk)
