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


def momentum_step(buf: torch.Tensor, grad: torch.Tensor, momentum: float, nesterov: bool,
                  keep: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """M ← μM + g in place; returns the NS input (μM + g with Nesterov, else M): a new tensor, or `out` filled
    (any dtype and layout: the NS input can be written straight in the NS dtype and orientation, one pass).

    `keep` (bool, broadcastable) marks elements whose matrix got no gradient: their momentum stays as it was.
    """
    if keep is None:
        buf.mul_(momentum).add_(grad)
    else:
        buf.copy_(torch.where(keep, buf, buf * momentum + grad))
    if nesterov:
        return grad.add(buf, alpha=momentum) if out is None else torch.add(grad, buf, alpha=momentum, out=out)
    return buf.clone() if out is None else out.copy_(buf)


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
                     weight_decay: float, keep: torch.Tensor | None = None) -> None:
    """W ← W(1 − ηλ) − η s O. With a scalar s and nothing to keep, O (e.g. bf16) is added in place without
    materializing s·O; otherwise through `scaled_update` + `apply_update`. Every path uses this function."""
    if keep is None and not isinstance(scale, torch.Tensor):
        param.mul_(1.0 - lr * weight_decay).add_(orthogonal, alpha=-lr * scale)
    else:
        apply_update(param, scaled_update(orthogonal, scale, param.dtype), lr, weight_decay, keep)


def adamw_step(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
               exp_avg_sqs: list[torch.Tensor], steps: list[float], lr: float, weight_decay: float,
               betas: tuple[float, float], eps: float, want_update: bool = False) -> list[torch.Tensor] | None:
    """Decoupled AdamW (Loshchilov & Hutter) on lists of tensors; `steps` are the already-incremented counts.

    Returns the lr-free updates m̂/(sqrt(v̂)+ε) when `want_update` (for update-RMS telemetry).
    """
    if not params:
        return [] if want_update else None
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
    for m, d in zip(exp_avgs, denom):  # m / d into d's memory: no second parameter-sized allocation
        torch.div(m, d, out=d)
    torch._foreach_div_(denom, bias1)
    return denom
