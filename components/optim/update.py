"""The per-tensor math of one optimizer step, shared by the single-device, ZeRO-1 and FSDP2 paths.

Every function is elementwise (or per matrix for the update scale), so a path that works on a slice of a
parameter gets exactly the numbers the single-device step gets for that slice. Moonlight §2.1–2.2:

    M_t = μ M_{t-1} + g_t                              (Eq. 1, sum momentum)
    X_t = μ M_t + g_t   (Nesterov, footnote 1)   or   M_t
    O_t = NS(X_t)                                      (Eq. 2)
    W_t = W_{t-1} − η (s · O_t + λ W_{t-1})            (Eq. 4 = Eq. 7)
"""
from __future__ import annotations

import math

import torch

SCALE_MODES = ("moonlight", "keller", "update_norm", "baseline", "none")
# On CPU the elementwise chains run block by block, BLOCK_ELEMENTS elements at a time: a mixed-dtype op there
# (fp32 weight += bf16 O) first converts its operand into a temporary, and whole-tensor temporaries of hundreds of
# MB come from fresh, page-faulted memory every step and push the chain's operands out of cache; a block's
# temporaries are small and reused, and its whole chain runs while it is in cache (bench/optimizer_step.py). CUDA
# runs each op on whole tensors (its allocator caches; one launch per op).
BLOCK_ELEMENTS = 1 << 18


def block_size(device: torch.device) -> int | None:
    """Elements per block of the elementwise chains on `device`; None: whole tensors."""
    return BLOCK_ELEMENTS if device.type == "cpu" else None


def blocks(*tensors, size: int | None = BLOCK_ELEMENTS) -> list[tuple]:
    """Matching views of `tensors`, covering them exactly, at most ~`size` elements each; elementwise ops on the
    views write into the tensors. The first tensor sets the shape; the others broadcast to it (a keep mask or a
    per-matrix scale [..., 1, 1] stays as it is; any other broadcast shape is expanded, so write only into tensors
    of the first's shape); non-tensors (None, a float) pass through. 1-D: flat pieces. [..., A, B] (any strides,
    e.g. the transposed NS buffers): row ranges of each matrix. One block, the tensors themselves, when `size` is
    None, the first is small, or a view cannot be made. fp32 results are bitwise those of whole tensors; bf16 op bf16
    may differ by one unit in the last place after a block's last full vector (torch's scalar tail rounds apart).
    """
    first = tensors[0]
    if size is None or first.numel() <= size:
        return [tensors]
    tensors = (first, *(_broadcast_to(t, first) for t in tensors[1:]))
    if first.ndim == 1:
        pieces = [t.split(size) if isinstance(t, torch.Tensor) else None for t in tensors]
        n = len(pieces[0])
        return [tuple(t[i] if t is not None else x for t, x in zip(pieces, tensors)) for i in range(n)]
    rows, cols = first.shape[-2:]
    try:
        views = [t.view(-1, *t.shape[-2:]) if isinstance(t, torch.Tensor) else t for t in tensors]
    except RuntimeError:  # not viewable as [N, A, B] without a copy
        return [tensors]
    step = max(1, size // cols)
    out = []
    for n in range(views[0].shape[0]):
        for r in range(0, rows, step):
            out.append(tuple(v if not isinstance(v, torch.Tensor) else v[n, r:r + step] if v.shape[-2] == rows
                             else v[n] for v in views))
    return out


def _broadcast_to(t, first: torch.Tensor):
    """`t` as `blocks` can cut it beside `first`: first's shape, one value per matrix, or expanded (a view)."""
    if not isinstance(t, torch.Tensor) or t.shape == first.shape:
        return t
    if first.ndim >= 2 and t.ndim == first.ndim and t.shape[:-2] == first.shape[:-2]:
        return t  # per matrix ([..., 1, 1]), per row or per column: its rows are cut with the first's, or broadcast
    return t.expand(first.shape)


def momentum_step(buf: torch.Tensor, grad: torch.Tensor, momentum: float, nesterov: bool,
                  keep: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """M ← μM + g in place; returns the NS input (μM + g with Nesterov, else M): a new tensor, or `out` filled
    (any dtype and layout: the NS input can be written straight in the NS dtype and orientation, one pass).

    `keep` (bool, buf's shape or one per matrix) marks elements whose matrix got no gradient: their momentum
    stays as it was. Runs block by block on CPU (`blocks`).
    """
    if out is None:  # the dtype `grad.add(buf)` would give with Nesterov
        out = torch.empty_like(buf, dtype=torch.promote_types(buf.dtype, grad.dtype) if nesterov else buf.dtype)
    for b, g, k, o in blocks(buf, grad, keep, out, size=block_size(buf.device)):
        if k is None:
            b.mul_(momentum).add_(g)
        else:
            b.copy_(torch.where(k, b, b * momentum + g))
        if nesterov:
            torch.add(g, b, alpha=momentum, out=o)
        else:
            o.copy_(b)
    return out


def update_scale(mode: str, shape: torch.Size | tuple[int, ...], orthogonal: torch.Tensor | None = None,
                 hidden_size: int | None = None, update_rms: float = 0.2) -> float | torch.Tensor:
    """s in W ← W − η(s·O + λW) for matrices of shape [..., A, B] (A, B = each matrix's own dims).

    With r = `update_rms` (the paper's 0.2, AdamW's typical update RMS; App. A Table 8 sweeps 0.05 … 0.8):
    moonlight r·sqrt(max(A, B)) (Eq. 4/7: an orthogonal A×B matrix has RMS 1/sqrt(max(A, B)), so the update's
    RMS is r); update_norm r/RMS(O) per matrix (Eq. 6); baseline r·sqrt(H) (Eq. 5); keller sqrt(max(1, A/B)) and
    none 1 ignore r.
    """
    a, b = shape[-2], shape[-1]
    if mode == "moonlight":
        return update_rms * math.sqrt(max(a, b))
    if mode == "keller":
        return math.sqrt(max(1.0, a / b))
    if mode == "baseline":
        if hidden_size is None:
            raise ValueError("scale_mode='baseline' needs scale_hidden_size (the model's hidden size H)")
        return update_rms * math.sqrt(hidden_size)
    if mode == "none":
        return 1.0
    if mode == "update_norm":
        o = orthogonal.float()
        rms = o.square().mean(dim=(-2, -1), keepdim=True).sqrt()
        return update_rms / rms.clamp(min=1e-12)
    raise ValueError(f"scale_mode={mode!r} is unknown; choose one of {SCALE_MODES}")


def scaled_update(orthogonal: torch.Tensor, scale: float | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """U = s·O in the parameter dtype (the lr-free Muon update whose RMS Lemma 1 predicts)."""
    return orthogonal.to(dtype) * scale


def apply_update(param: torch.Tensor, update: torch.Tensor, lr: float, weight_decay: float,
                 keep: torch.Tensor | None = None) -> None:
    """W ← W(1 − ηλ) − η U, decoupled weight decay with the unscaled η (Moonlight toy_train, torch.optim.Muon)."""
    if keep is None:
        param.mul_(1.0 - lr * weight_decay).add_(update, alpha=-lr)
    else:
        new = param * (1.0 - lr * weight_decay) - lr * update
        param.copy_(torch.where(keep, param, new))


def apply_orthogonal(param: torch.Tensor, orthogonal: torch.Tensor, scale: float | torch.Tensor, lr: float,
                     weight_decay: float, keep: torch.Tensor | None = None, squares: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """W ← W(1 − ηλ) − η s O. With a scalar s and nothing to keep, O (e.g. bf16) is added in place without
    materializing s·O; otherwise through `scaled_update` + `apply_update`. Every path uses this function.

    `squares` (telemetry; not with `keep`): returns (Σ(s·O)², Σ W_new²) in float32, summed block by block while
    each block is in cache.
    """
    if squares and keep is not None:
        raise ValueError("apply_orthogonal: squares=True needs keep=None (the kept matrices' O is not an update)")
    update_sq, weight_sq = [], []
    size = block_size(param.device)
    # CPU, O in another dtype: each block is widened once into one reused scratch block; fp32 += fp32 then reads
    # it with unit stride (O from a transposed NS buffer is strided), and its square sum reads it again in cache.
    # Only a narrower O (bf16 into fp32 W): W += O computes in the wider dtype, which the scratch then holds.
    widen = (size is not None and orthogonal.dtype != param.dtype and orthogonal.numel() > size
             and torch.promote_types(param.dtype, orthogonal.dtype) == param.dtype)
    scratch = None
    if widen:  # as large as the largest block `blocks` cuts
        scratch = param.new_empty(size if param.ndim == 1 else max(size, param.shape[-1]))
    for w, o, s, k in blocks(param, orthogonal, scale, keep, size=size):
        if widen and o.numel() <= scratch.numel():  # (an unviewable tensor comes as one whole block)
            o = scratch[:o.numel()].view(o.shape).copy_(o)
        if k is None and not isinstance(s, torch.Tensor):
            w.mul_(1.0 - lr * weight_decay).add_(o, alpha=-lr * s)
        else:
            apply_update(w, scaled_update(o, s, w.dtype), lr, weight_decay, k)
        if squares:
            update_sq.append(square_sum(o, s))
            weight_sq.append(square_sum(w))
    if not squares:
        return None
    return torch.stack(update_sq).sum(), torch.stack(weight_sq).sum()


def square_sum(t: torch.Tensor, scale: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Σ(scale·t)² in float32 (scale: a number or one per matrix, broadcastable); call it on a block on CPU."""
    if isinstance(scale, torch.Tensor):
        return (t.float() * scale).square().sum()
    if t.dtype == torch.float32 and t.is_contiguous():  # a dot product: a third of vector_norm's time on CPU
        flat = t.view(-1)
        return torch.dot(flat, flat) * (scale * scale)
    return torch.linalg.vector_norm(t, dtype=torch.float32).square() * (scale * scale)


def adamw_step(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
               exp_avg_sqs: list[torch.Tensor], steps: list[float], lr: float, weight_decay: float,
               betas: tuple[float, float], eps: float, want_update: bool = False) -> torch.Tensor | None:
    """Decoupled AdamW (Loshchilov & Hutter) on lists of tensors; `steps` are the already-incremented counts.

    With `want_update`, returns (Σu², ΣW²) per parameter (two float32 vectors), u = m̂/(sqrt(v̂)+ε) the lr-free
    update and W the updated weight, for telemetry, computed block by block (no parameter-sized update is kept). On CPU it runs on flat
    blocks of ~BLOCK_ELEMENTS elements (small tensors share one call); elsewhere one call for all.
    """
    if not params:
        return (torch.zeros(0), torch.zeros(0)) if want_update else None
    size = block_size(params[0].device)
    owners, norms = [], []
    batch, count = [], 0

    def run() -> None:
        out = _adamw_lists(*map(list, zip(*batch)), lr, weight_decay, betas, eps, want_update)
        if want_update:
            norms.extend(out)

    for i, tensors in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        if all(t.is_contiguous() for t in tensors):
            tensors = tuple(t.view(-1) for t in tensors)
        for piece in blocks(*tensors, size=size):
            batch.append((*piece, steps[i]))
            owners.append(i)
            count += piece[0].numel()
            if size is not None and count >= size:
                run()
                batch, count = [], 0
    if batch:
        run()
    if not want_update:
        return None
    index = torch.tensor(owners, device=norms[0][0].device)
    update_norms, weight_norms = (torch.stack(n).float().square() for n in zip(*norms))
    zeros = torch.zeros(len(params), dtype=torch.float32, device=index.device)
    return zeros.index_add(0, index, update_norms), zeros.index_add(0, index, weight_norms)


def _adamw_lists(params, grads, exp_avgs, exp_avg_sqs, steps, lr, weight_decay, betas, eps,
                 want_update: bool = False) -> list[torch.Tensor] | None:
    """The AdamW math of `adamw_step` on lists (foreach ops); with `want_update`, (‖u‖, ‖W‖) of each tensor, u
    its lr-free update (computed in the denominator's memory: no further allocation) and W the updated weight."""
    beta1, beta2 = betas
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
    torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    bias1 = [1.0 - beta1 ** s for s in steps]
    bias2_sqrt = [math.sqrt(1.0 - beta2 ** s) for s in steps]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, [-lr / b for b in bias1])
    if not want_update:
        return None
    for m, d in zip(exp_avgs, denom):
        torch.div(m, d, out=d)
    torch._foreach_div_(denom, bias1)
    norms = (torch._foreach_norm(t, dtype=torch.float32) for t in (denom, params))  # fp16 squares overflow
    return list(zip(*norms))
