"""Newton–Schulz orthogonalization (Moonlight Eq. 2) with pluggable coefficient schedules.

    X_0 = G / (s·||G||_F + eps)                      s = 1 (paper) or a small safety margin (Polar Express)
    X_k = a_k X + b_k (X Xᵀ) X + c_k (X Xᵀ)² X       k = 1..steps

The iteration runs on the wide orientation (rows <= columns, transposing tall matrices) and is batched over every
leading dimension, so a stacked expert tensor [E, A, B] is E independent matrices. It never writes into its input
(torch #194664: `G.bfloat16()` aliases G when G is already bf16) unless asked to (`overwrite_input`, for the
optimizer's private NS input); its products write into three buffers allocated once per call.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

Triple = tuple[float, float, float]


@dataclass(frozen=True)
class CoefficientSchedule:
    """Per-step (a, b, c) triples; steps beyond the list repeat the last triple.

    `norm_safety` multiplies the Frobenius norm in the normalization (> 1 keeps the spectral norm safely below 1
    in low precision, as Polar Express does).
    """

    name: str
    triples: tuple[Triple, ...]
    norm_safety: float = 1.0

    def __post_init__(self) -> None:
        if not self.triples or any(len(t) != 3 for t in self.triples):
            raise ValueError(f"ns_coefficients: {self.name!r} needs at least one (a, b, c) triple, got {self.triples!r}")
        if not self.norm_safety > 0:
            raise ValueError(f"ns_coefficients: norm_safety={self.norm_safety!r} must be > 0")

    def for_steps(self, steps: int) -> list[Triple]:
        return [self.triples[min(k, len(self.triples) - 1)] for k in range(steps)]


# Moonlight §2.1 / Eq. 2: the fixed quintic of Keller Jordan's Muon, used for all 5 steps.
QUINTIC = CoefficientSchedule("quintic", ((3.4445, -4.7750, 2.0315),))
# Polar Express (Amsel et al. 2025, arXiv 2505.16932): minimax-optimal per-step quintics for 5 iterations, with the
# 2% normalization safety margin of the 5-step set used by modded-nanogpt and microsoft/dion.
POLAR_EXPRESS = CoefficientSchedule(
    "polar_express",
    (
        (8.156554524902461, -22.48329292557795, 15.878769915207462),
        (4.042929935166739, -2.808917465908714, 0.5000178451051316),
        (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
        (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
        (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
    ),
    norm_safety=1.02,
)
NS_METHODS = ("standard", "gram", "auto")
GRAM_MIN_ASPECT = 3.0
SCHEDULES: dict[str, CoefficientSchedule] = {"quintic": QUINTIC, "moonlight": QUINTIC, "polar_express": POLAR_EXPRESS}


def resolve_coefficients(coefficients: str | CoefficientSchedule | Sequence) -> CoefficientSchedule:
    """A schedule from a name ('quintic' = the paper's fixed triple, 'polar_express'), one triple or a list of them."""
    if isinstance(coefficients, CoefficientSchedule):
        return coefficients
    if isinstance(coefficients, str):
        if coefficients not in SCHEDULES:
            raise ValueError(f"ns_coefficients={coefficients!r} is unknown; choose one of {sorted(SCHEDULES)} "
                             "or pass (a, b, c) triples")
        return SCHEDULES[coefficients]
    try:
        items = list(coefficients)
        if len(items) == 3 and all(isinstance(x, (int, float)) for x in items):
            return CoefficientSchedule("custom", (tuple(float(x) for x in items),))
        return CoefficientSchedule("custom", tuple(tuple(float(x) for x in t) for t in items))
    except TypeError as exc:
        raise ValueError(f"ns_coefficients={coefficients!r} must be a name, an (a, b, c) triple or a list of "
                         "triples") from exc


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    allowed = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
               "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}
    if dtype not in allowed:
        raise ValueError(f"ns_dtype={dtype!r} is unknown; choose one of {sorted(allowed)} or a torch.dtype")
    return allowed[dtype]


def newton_schulz(
    G: torch.Tensor,
    steps: int = 5,
    coefficients: str | CoefficientSchedule | Sequence = "quintic",
    dtype: torch.dtype | str = torch.bfloat16,
    eps: float = 1e-7,
    out_dtype: torch.dtype | None = None,
    method: str = "standard",
    overwrite_input: bool = False,
) -> torch.Tensor:
    """Approximate the orthogonal polar factor U Vᵀ of each matrix in G [..., A, B] (Moonlight Eq. 2).

    method: 'standard' iterates on X (the paper); 'gram' iterates on the small Gram matrix (see `_gram_iterate`),
    the same polynomial in exact arithmetic with fewer FLOPs for rectangular matrices; 'auto' picks 'gram' when
    the long side is at least GRAM_MIN_ASPECT times the short one.
    Returns a tensor of G's shape in `out_dtype` (default: G's dtype). G is not modified unless `overwrite_input`
    and G is already in the compute dtype with its wide orientation contiguous (G, or G.mT when G is tall): then
    the iteration starts in G's memory instead of a copy (the optimizer's private NS input).
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz: G must have at least 2 dimensions, got shape {tuple(G.shape)}")
    if steps < 0:
        raise ValueError(f"newton_schulz: steps={steps} must be >= 0")
    if method not in NS_METHODS:
        raise ValueError(f"newton_schulz: method={method!r} is unknown; choose one of {NS_METHODS}")
    schedule = resolve_coefficients(coefficients)
    compute = resolve_dtype(dtype)
    shape = G.shape
    matrices = G.reshape(-1, *shape[-2:]) if G.ndim > 3 else G  # one batch dimension for baddbmm
    tall = shape[-2] > shape[-1]
    X = matrices.mT if tall else matrices  # the wide orientation: rows <= columns
    if not (overwrite_input and X.dtype == compute and X.is_contiguous()):
        # A private row-major copy in one pass (conversion and transpose together): nothing below may write into
        # G (torch #194664), and the products run several times faster on a row-major wide operand on CPU.
        X = X.to(dtype=compute, memory_format=torch.contiguous_format, copy=True)
    out = _orthogonalize(X, steps, schedule, eps, method)
    return (out.mT if tall else out).reshape(shape).to(out_dtype or G.dtype)


def _orthogonalize(X: torch.Tensor, steps: int, schedule: CoefficientSchedule, eps: float,
                   method: str) -> torch.Tensor:
    """NS on one wide matrix [m, n] or a batch [N, m, n] (m <= n), consuming X (normalized in place)."""
    norm = torch.linalg.matrix_norm(X, keepdim=True)
    X.div_(norm * schedule.norm_safety + eps)
    aspect = X.shape[-1] / max(1, X.shape[-2])
    if method == "gram" or (method == "auto" and aspect >= GRAM_MIN_ASPECT):
        return _gram_iterate(X, schedule.for_steps(steps))
    return _iterate(X, schedule.for_steps(steps))


def _iterate(X: torch.Tensor, triples: list[Triple]) -> torch.Tensor:
    """X ← aX + (bA + cA²)X with A = XXᵀ: per step 2 products with the long side and one m×m product. Three
    buffers for the whole iteration (A, B and the next X): no fresh allocation per step."""
    if not triples:
        return X
    gram = (*X.shape[:-1], X.shape[-2])
    A, B, Y = X.new_empty(gram), X.new_empty(gram), torch.empty_like(X)
    addmm = torch.baddbmm if X.ndim == 3 else torch.addmm
    for a, b, c in triples:
        torch.matmul(X, X.mT, out=A)
        addmm(A, A, A, beta=b, alpha=c, out=B)
        addmm(X, B, X, beta=a, out=Y)
        X, Y = Y, X
    return X


def _gram_iterate(X: torch.Tensor, triples: list[Triple], restart_at: int = 2) -> torch.Tensor:
    """Gram Newton–Schulz: with R = XXᵀ (m×m, m the short side) and P = aI + bR + cR², one step is X ← PX, so
    R ← PRP and the product of the P's accumulates in Q; X is touched only at the start, at one restart
    (X ← QX, R recomputed, which stops bf16 drift in R) and at the end. For m×n, 5 steps: 8m²n + 32m³ FLOPs
    against 20m²n + 10m³ for `_iterate`.
    """
    eye = torch.eye(X.shape[-2], dtype=X.dtype, device=X.device)
    R = X @ X.mT
    Q = None
    for k, (a, b, c) in enumerate(triples):
        if k == restart_at and Q is not None:
            X = Q @ X
            R = X @ X.mT
            Q = None
        P = torch.baddbmm(R, R, R, beta=b, alpha=c) if R.ndim == 3 else torch.addmm(R, R, R, beta=b, alpha=c)
        P = P + a * eye
        Q = P if Q is None else P @ Q
        if k < len(triples) - 1:
            R = P @ R @ P
    return X if Q is None else Q @ X
