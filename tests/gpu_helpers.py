"""Shared by the tests marked `gpu` (tests/test_gpu_*.py): the device, the error measure and its tolerances.

Tolerances follow the measure ||out - ref|| / ||ref|| against a float64 reference (on the CPU): fp32 arithmetic
lands far under 1e-5, bf16 operands near 5e-3 (measured on this CPU for the expert SwiGLU: 5.5e-3 forward and
backward; Newton–Schulz bf16 vs fp32: 0.9-1.2e-2 on the bench shapes), so the bounds sit about 3x above that.
"""
from __future__ import annotations

import pytest
import torch

CUDA = torch.device("cuda")
FP32_TOL = 1e-5
BF16_TOL = 2e-2
NS_BF16_TOL = 3.5e-2


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| in float64 on the CPU (NaN anywhere gives NaN, which fails every bound)."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    return float((got - ref).norm() / ref.norm())


def randn(*shape: int, seed: int, scale: float = 1.0, device=None, dtype=torch.float32) -> torch.Tensor:
    """Fresh normal values drawn on the CPU (the same numbers whatever the device), then moved (default: CUDA)."""
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    return t.to(device=CUDA if device is None else device, dtype=dtype)


@pytest.fixture(autouse=True)
def exact_fp32_matmuls():
    """fp32 tolerances assume real fp32 matmuls: TF32 (about 3e-4) would be a different, looser test."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
