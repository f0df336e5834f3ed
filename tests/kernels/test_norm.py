from __future__ import annotations

import pytest
import torch

from kestrel.kernels.norm import rms_norm
from tests.kernels.paged_refs import rel_err


def _reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (weight.float() * normed.float()).to(x.dtype)


@pytest.mark.parametrize("hidden", [64, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(hidden, dtype, with_residual, device):
    gen = torch.Generator().manual_seed(hidden)
    x = (3 * torch.randn(9, hidden, generator=gen)).to(dtype=dtype, device=device)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype=dtype, device=device)
    eps = 1e-6
    if with_residual:
        residual = torch.randn(9, hidden, generator=gen).to(dtype=dtype, device=device)
        out, new_residual = rms_norm(x, weight, eps, residual=residual)
        expected_residual = x + residual
        assert torch.equal(new_residual, expected_residual)
        ref = _reference(expected_residual, weight, eps)
    else:
        out = rms_norm(x, weight, eps)
        ref = _reference(x, weight, eps)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < (1e-6 if dtype == torch.float32 else 1e-3)


def test_rms_norm_strided_rows(device):
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(5, 96, generator=gen).to(device)
    x = base[:, :64]  # rows with stride 96
    weight = torch.randn(64, generator=gen).to(device)
    assert rel_err(rms_norm(x, weight, 1e-5), _reference(x, weight, 1e-5)) < 1e-6


@pytest.mark.gpu
def test_rms_norm_bf16_real_shapes(device):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3000, 4096, generator=gen).to(dtype=torch.bfloat16, device=device)
    residual = torch.randn(3000, 4096, generator=gen).to(dtype=torch.bfloat16, device=device)
    weight = torch.randn(4096, generator=gen).to(dtype=torch.bfloat16, device=device)
    out, new_residual = rms_norm(x, weight, 1e-6, residual=residual)
    assert torch.equal(new_residual, x + residual)
    assert rel_err(out, _reference(x + residual, weight, 1e-6)) < 1e-2
