"""Pure fits for the scaling experiments (Moonlight §3.2, Fig. 1a / Fig. 3): L = a·C^b and L(D) = α·D^−β + γ,
with their inversions (the compute or the tokens that reach a given loss).

numpy only: the power law is a straight line in log space (least squares); the saturating law is profiled over γ
(for a fixed γ, log(L − γ) is linear in log D, so α and β have a closed form) and γ is found by a grid followed by
a golden-section search on the residual sum of squares of L itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PowerLaw:
    """L = a · C^b (b < 0 when more compute lowers the loss)."""

    a: float
    b: float

    def __call__(self, c):
        return self.a * np.power(np.asarray(c, dtype=float), self.b)

    def inverse(self, loss: float) -> float:
        """The C at which the law reaches `loss`."""
        if loss <= 0:
            raise ValueError(f"PowerLaw.inverse: loss={loss!r} must be > 0")
        if self.b == 0:
            raise ValueError("PowerLaw.inverse: b=0, the loss does not depend on C")
        return float((loss / self.a) ** (1.0 / self.b))


@dataclass(frozen=True)
class SaturatingPowerLaw:
    """L(D) = α · D^−β + γ: γ is the loss no amount of data goes below (at this model size)."""

    alpha: float
    beta: float
    gamma: float

    def __call__(self, d):
        return self.alpha * np.power(np.asarray(d, dtype=float), -self.beta) + self.gamma

    def inverse(self, loss: float) -> float:
        """The D at which the law reaches `loss`; inf when `loss` is at or below γ (never reached)."""
        if loss <= self.gamma:
            return math.inf
        return float(((loss - self.gamma) / self.alpha) ** (-1.0 / self.beta))


def _checked(x, y, name_x: str, name_y: str, minimum: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"fit: {name_x} and {name_y} must be 1-D of the same length, got {x.shape} and {y.shape}")
    if x.size < minimum:
        raise ValueError(f"fit: needs at least {minimum} points, got {x.size}")
    for name, v in ((name_x, x), (name_y, y)):
        if not np.all(np.isfinite(v)) or np.any(v <= 0):
            raise ValueError(f"fit: every {name} must be finite and > 0, got {v.tolist()}")
    if np.unique(x).size < 2:
        raise ValueError(f"fit: {name_x} must take at least two distinct values, got {x.tolist()}")
    return x, y


def fit_power_law(c, loss) -> PowerLaw:
    """Least squares of log L = log a + b·log C (as the paper's loss-vs-compute lines)."""
    c, loss = _checked(c, loss, "C", "L", 2)
    b, log_a = np.polyfit(np.log(c), np.log(loss), 1)
    return PowerLaw(a=float(math.exp(log_a)), b=float(b))


def _profile(d: np.ndarray, loss: np.ndarray, gamma: float) -> tuple[float, float, float]:
    """(α, β, SSE) of the best L = α·D^−β + γ for this γ."""
    slope, intercept = np.polyfit(np.log(d), np.log(loss - gamma), 1)
    alpha, beta = math.exp(intercept), -slope
    sse = float(np.sum((alpha * d ** (-beta) + gamma - loss) ** 2))
    return alpha, beta, sse


def fit_saturating_power_law(d, loss, grid: int = 200, iterations: int = 100) -> SaturatingPowerLaw:
    """L(D) = α·D^−β + γ with 0 <= γ < min(L), least squares in L (needs >= 3 budgets)."""
    d, loss = _checked(d, loss, "D", "L", 3)
    top = float(loss.min()) * (1.0 - 1e-9)
    gammas = np.linspace(0.0, top, grid, endpoint=False)
    errors = [_profile(d, loss, g)[2] for g in gammas]
    k = int(np.argmin(errors))
    lo, hi = gammas[max(k - 1, 0)], (gammas[k + 1] if k + 1 < grid else top)
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    for _ in range(iterations):  # golden section inside the best grid cell's neighbourhood
        g1, g2 = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if _profile(d, loss, g1)[2] <= _profile(d, loss, g2)[2]:
            hi = g2
        else:
            lo = g1
    gamma = (lo + hi) / 2.0
    alpha, beta, _ = _profile(d, loss, gamma)
    if not beta > 0:
        raise ValueError(f"fit: the loss does not fall with D (β={beta:.3g}); the budgets {d.tolist()} give "
                         f"losses {loss.tolist()}")
    return SaturatingPowerLaw(alpha=alpha, beta=beta, gamma=gamma)


def compute_ratio_at_equal_loss(reference: PowerLaw, other: PowerLaw, c: float) -> float:
    """C_other / C at the loss `reference` reaches with compute C (the paper's "0.519x FLOPs" at C)."""
    return other.inverse(float(reference(c))) / c
