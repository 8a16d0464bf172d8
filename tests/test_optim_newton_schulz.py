"""Newton–Schulz (Moonlight Eq. 2) and the update scale of Lemma 1."""
import math

import pytest
import torch

from components.optim.newton_schulz import POLAR_EXPRESS, QUINTIC, newton_schulz, resolve_coefficients
from components.optim.update import scaled_update, update_scale


def _singular_values(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(x.double())


def _rms(x: torch.Tensor) -> float:
    return float(x.double().square().mean().sqrt())


@pytest.mark.parametrize("shape", [(32, 32), (16, 48), (48, 16)])
def test_quintic_ns5_maps_singular_values_into_the_papers_band(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    s = _singular_values(newton_schulz(g, dtype=torch.float32))
    # Keller's quintic does not converge to 1; it lands every singular value in roughly [0.7, 1.2].
    assert s.min() > 0.6 and s.max() < 1.25, s


def test_polar_express_is_closer_to_orthogonal_than_the_fixed_quintic():
    g = torch.randn(32, 96, generator=torch.Generator().manual_seed(1))  # well conditioned
    err_q = (_singular_values(newton_schulz(g, coefficients="quintic", dtype=torch.float32)) - 1).abs().max()
    err_pe = (_singular_values(newton_schulz(g, coefficients="polar_express", dtype=torch.float32)) - 1).abs().max()
    assert err_pe < err_q
    assert err_pe < 0.15  # minimax design: every singular value within ~14% of 1


def test_batched_stack_equals_one_matrix_at_a_time():
    g = torch.randn(5, 12, 20, generator=torch.Generator().manual_seed(2))
    batched = newton_schulz(g, dtype=torch.float32)
    looped = torch.stack([newton_schulz(m, dtype=torch.float32) for m in g])
    torch.testing.assert_close(batched, looped, rtol=0, atol=1e-6)


def test_tall_matrix_is_the_transpose_of_its_wide_transpose():
    g = torch.randn(40, 12, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(newton_schulz(g, dtype=torch.float32), newton_schulz(g.T, dtype=torch.float32).T,
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_input_is_never_modified_even_when_its_dtype_matches(dtype):
    # torch #194664: `G.bfloat16()` returns G itself when G is bf16, and an in-place normalization corrupts it.
    g = torch.randn(8, 16, generator=torch.Generator().manual_seed(4)).to(dtype)
    before = g.clone()
    out = newton_schulz(g, dtype=dtype)
    assert torch.equal(g, before)
    assert out.data_ptr() != g.data_ptr()


@pytest.mark.parametrize("shape", [(12, 40), (40, 12), (3, 12, 40), (3, 40, 12)])
def test_overwrite_input_starts_in_the_inputs_memory_with_the_same_numbers(shape):
    """The optimizer's private NS input (bf16, stored wide and row-major) is consumed instead of copied."""
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(5))
    expected = newton_schulz(g)  # fp32 in, bf16 compute: a private copy
    tall = shape[-2] > shape[-1]
    wide = (g.mT if tall else g).to(torch.bfloat16).contiguous()
    x = wide.mT if tall else wide  # the same matrices as g, in the compute dtype, wide storage
    before = wide.clone()
    got = newton_schulz(x, overwrite_input=True)
    assert torch.equal(got, expected)
    assert not torch.equal(wide, before)  # the iteration ran in x's memory
    untouched = g.clone()
    newton_schulz(g, overwrite_input=True)  # not in the compute dtype: copied, whatever the flag
    assert torch.equal(g, untouched)


def test_zero_matrix_stays_zero_and_output_dtype_defaults_to_input():
    out = newton_schulz(torch.zeros(3, 4, 6), dtype=torch.float32)
    assert out.dtype == torch.float32 and torch.count_nonzero(out) == 0


@pytest.mark.parametrize("shape", [(16, 64), (96, 24), (3, 8, 40)])
def test_gram_iteration_is_the_same_polynomial(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(7))
    for coefficients in ("quintic", "polar_express"):
        standard = newton_schulz(g, coefficients=coefficients, dtype=torch.float64)
        gram = newton_schulz(g, coefficients=coefficients, dtype=torch.float64, method="gram")
        torch.testing.assert_close(gram, standard, rtol=0, atol=1e-10)
    bf16 = newton_schulz(g, dtype=torch.bfloat16, method="gram", out_dtype=torch.float32)
    reference = newton_schulz(g, dtype=torch.float64).float()
    assert (bf16 - reference).norm() / reference.norm() < 0.05
    assert torch.equal(newton_schulz(g, method="auto"), newton_schulz(g, method="gram"))


def test_coefficient_schedules_and_bad_input():
    assert QUINTIC.for_steps(3) == [(3.4445, -4.7750, 2.0315)] * 3
    assert POLAR_EXPRESS.for_steps(7)[5:] == [POLAR_EXPRESS.triples[-1]] * 2
    assert resolve_coefficients((1.5, -0.5, 0.0)).triples == ((1.5, -0.5, 0.0),)
    with pytest.raises(ValueError, match="ns_coefficients='cubic'"):
        resolve_coefficients("cubic")
    with pytest.raises(ValueError, match=r"shape \(7,\)"):
        newton_schulz(torch.randn(7))
    with pytest.raises(ValueError, match="method='fast'"):
        newton_schulz(torch.randn(3, 3), method="fast")


def _svd_orthogonal(g: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
    return (u @ vh).float()


@pytest.mark.parametrize("shape", [(64, 64), (64, 256), (256, 64), (8, 128, 32)])
def test_lemma1_moonlight_update_rms_is_0_2(shape):
    """Lemma 1: a full-rank orthogonal [A, B] matrix has RMS sqrt(1/max(A, B)); times 0.2·sqrt(max) gives 0.2."""
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(5))
    exact = scaled_update(_svd_orthogonal(g), update_scale("moonlight", g.shape), torch.float32)
    assert abs(_rms(exact) - 0.2) < 1e-5
    ns5 = newton_schulz(g, dtype=torch.bfloat16)
    approx = scaled_update(ns5, update_scale("moonlight", g.shape), torch.float32)
    assert 0.15 <= _rms(approx) <= 0.25, _rms(approx)


def test_scale_modes_relative_to_each_other():
    shape = (16, 64)
    o = _svd_orthogonal(torch.randn(*shape, generator=torch.Generator().manual_seed(6)))
    assert update_scale("keller", shape) == 1.0 and update_scale("keller", (64, 16)) == 2.0
    assert update_scale("none", shape) == 1.0
    assert update_scale("baseline", shape, hidden_size=100) == pytest.approx(2.0)
    assert _rms(scaled_update(o, update_scale("update_norm", shape, o), torch.float32)) == pytest.approx(0.2, 1e-6)
    assert update_scale("moonlight", shape) == pytest.approx(0.2 * math.sqrt(64))
    with pytest.raises(ValueError, match="scale_hidden_size"):
        update_scale("baseline", shape)
