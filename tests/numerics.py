"""Tolerances that follow from the dtype, not from one CPU's kernels.

Two computations of the same value that differ only in the order of floating-point operations (another matmul
kernel, a narrower batch, AMX vs AVX-512 vs AVX2) agree up to rounding that grows with the values' magnitude.
A real defect (a wrong position, mask or cache slot) changes results by orders of magnitude more than that.
"""

from __future__ import annotations

import torch

ULPS = 256  # rounding steps allowed per unit of magnitude: generous for reordering, far below any real defect


def tolerance(expected: torch.Tensor, ulps: int = ULPS) -> float:
    """Absolute tolerance: ``ulps`` machine epsilons of the dtype, scaled by the tensor's largest magnitude."""
    eps = torch.finfo(expected.dtype).eps
    scale = max(1.0, float(expected.detach().abs().max())) if expected.numel() else 1.0
    return ulps * eps * scale


def assert_close_fp(actual: torch.Tensor, expected: torch.Tensor, ulps: int = ULPS) -> None:
    torch.testing.assert_close(actual, expected, atol=tolerance(expected, ulps), rtol=0)
