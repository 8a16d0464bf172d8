"""The scaling-law fits recover known parameters from synthetic data, invert exactly, and refuse bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest

from components.metrics.fits import (
    PowerLaw,
    SaturatingPowerLaw,
    compute_ratio_at_equal_loss,
    fit_power_law,
    fit_saturating_power_law,
)


def test_power_law_recovers_the_papers_muon_fit():
    c = np.geomspace(0.25, 4.0, 5)  # PF-days, the paper's range
    fit = fit_power_law(c, 2.506 * c ** -0.052)
    assert fit.a == pytest.approx(2.506, rel=1e-10)
    assert fit.b == pytest.approx(-0.052, rel=1e-9)


def test_power_law_with_noise_stays_close():
    rng = np.random.default_rng(0)
    c = np.geomspace(1e11, 1e13, 8)
    loss = 40.0 * c ** -0.08 * np.exp(rng.normal(0, 0.002, c.size))
    fit = fit_power_law(c, loss)
    assert fit.b == pytest.approx(-0.08, abs=0.004)


def test_saturating_law_recovers_alpha_beta_gamma():
    d = np.geomspace(1e5, 1e8, 6)
    truth = SaturatingPowerLaw(alpha=30.0, beta=0.3, gamma=2.5)
    fit = fit_saturating_power_law(d, truth(d))
    assert fit.gamma == pytest.approx(2.5, abs=1e-4)
    assert fit.beta == pytest.approx(0.3, rel=1e-3)
    assert fit.alpha == pytest.approx(30.0, rel=1e-2)


def test_inversions_are_exact():
    law = PowerLaw(2.608, -0.054)
    assert law.inverse(float(law(3.0))) == pytest.approx(3.0, rel=1e-12)
    sat = SaturatingPowerLaw(30.0, 0.3, 2.5)
    assert sat.inverse(float(sat(2e6))) == pytest.approx(2e6, rel=1e-9)
    assert sat.inverse(2.5) == math.inf and sat.inverse(2.4) == math.inf  # at or below the asymptote: never


def test_compute_ratio_at_equal_loss_is_the_analytic_one():
    adamw, muon = PowerLaw(2.608, -0.054), PowerLaw(2.506, -0.052)
    c = 4.0
    expected = (float(adamw(c)) / 2.506) ** (1 / -0.052) / c
    assert compute_ratio_at_equal_loss(adamw, muon, c) == pytest.approx(expected, rel=1e-12)
    assert 0.4 < expected < 0.6  # the paper's "about 52%" region (moonlight.md §4.4 [DERIVED])
    same = compute_ratio_at_equal_loss(adamw, adamw, c)
    assert same == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("x, y, message", [
    ([1.0], [2.0], "needs at least 2 points, got 1"),
    ([1.0, 2.0], [2.0, -1.0], "every L must be finite and > 0"),
    ([1.0, 1.0], [2.0, 1.0], "C must take at least two distinct values"),
    ([1.0, 2.0, 3.0], [2.0, 1.0], "must be 1-D of the same length"),
])
def test_power_law_bad_input(x, y, message):
    with pytest.raises(ValueError, match=message):
        fit_power_law(x, y)


def test_saturating_law_needs_three_budgets_and_a_falling_loss():
    with pytest.raises(ValueError, match="needs at least 3 points, got 2"):
        fit_saturating_power_law([1e5, 1e6], [3.0, 2.0])
    with pytest.raises(ValueError, match="the loss does not fall with D"):
        fit_saturating_power_law([1e5, 1e6, 1e7], [2.0, 2.5, 3.0])
