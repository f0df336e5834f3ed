from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kestrel.kernels.activation import silu_and_mul
from kestrel.kernels.gemv import MAX_ROWS, gemv
from kestrel.kernels.gemv_fused import gemv_rmsnorm, gemv_silu_mul
from tests.kernels.paged_refs import rel_err


@pytest.mark.parametrize("m", [1, 3, MAX_ROWS])
@pytest.mark.parametrize("n, k", [(1, 64), (37, 700), (300, 1024)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_float64(m, n, k, bias, device):
    gen = torch.Generator().manual_seed(n * k + m)
    x = torch.randn(m, k, generator=gen).to(device)
    w = torch.randn(n, k, generator=gen).to(device)
    b = torch.randn(n, generator=gen).to(device) if bias else None
    ref = x.double() @ w.double().T + (b.double() if bias else 0)
    out = gemv(x, w, b)
    assert out.shape == (m, n) and out.dtype == x.dtype
    assert rel_err(out, ref) < 1e-5


def test_gemv_strided_rows_and_fp16(device):
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(2, 600, generator=gen).to(device=device, dtype=torch.float16)
    x = base[:, :512]  # row stride 600, last dim contiguous
    w = torch.randn(96, 512, generator=gen).to(device=device, dtype=torch.float16)
    assert rel_err(gemv(x, w), x.double() @ w.double().T) < 2e-3


def test_gemv_rejects_wide_batches(device):
    with pytest.raises(AssertionError, match="rows"):
        gemv(torch.zeros(MAX_ROWS + 1, 8, device=device), torch.zeros(4, 8, device=device))



def _rmsnorm_inputs(n, k, dtype, residual, bias, device):
    gen = torch.Generator().manual_seed(n * k + 7)
    x = (3 * torch.randn(1, k, generator=gen)).to(device=device, dtype=dtype)
    res = torch.randn(1, k, generator=gen).to(device=device, dtype=dtype) if residual else None
    g = (1 + 0.1 * torch.randn(k, generator=gen)).to(device=device, dtype=dtype)
    w = torch.randn(n, k, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, generator=gen).to(device=device, dtype=dtype) if bias else None
    return x, res, g, w, b


def _rmsnorm_gemv_ref(h, g, eps, w, b):
    """The unfused math in float64: y = rms_norm(h) * g @ W.T + b."""
    h = h.double()
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * g.double()
    return normed @ w.double().T + (b.double() if b is not None else 0)


# Every residual/bias combination on the small shapes; the largest is slow under the interpreter.
_RMSNORM_CASES = [(n, k, dtype, residual, bias)
                  for n, k, dtype in ((1, 64, torch.float32), (37, 700, torch.float32),
                                      (37, 700, torch.float16))
                  for residual in (False, True) for bias in (False, True)]
_RMSNORM_CASES += [(300, 1024, torch.float32, False, False), (300, 1024, torch.float32, True, True)]


@pytest.mark.parametrize("n, k, dtype, residual, bias", _RMSNORM_CASES, ids=str)
def test_gemv_rmsnorm_matches_float64(n, k, dtype, residual, bias, device):
    x, res, g, w, b = _rmsnorm_inputs(n, k, dtype, residual, bias, device)
    eps = 1e-6
    y, h = gemv_rmsnorm(x, g, eps, w, residual=res, bias=b)
    assert y.shape == (1, n) and y.dtype == dtype
    assert h.shape == (1, k) and h.dtype == dtype
    if residual:
        assert h is not x and torch.equal(h, x + res)  # rounded to dtype exactly as norm.py
    else:
        assert h is x
    # The fused kernel skips the rounding of the normalized vector, so it tracks float64.
    assert rel_err(y, _rmsnorm_gemv_ref(x + res if residual else x, g, eps, w, b)) < (
        1e-5 if dtype == torch.float32 else 2e-3
    )


@pytest.mark.parametrize("n, i, bias", [(1, 64, False), (1, 64, True), (37, 700, False),
                                        (37, 700, True), (300, 1024, True)])
def test_gemv_silu_mul_matches_unfused(n, i, bias, device):
    gen = torch.Generator().manual_seed(n + i)
    x = (2 * torch.randn(1, 2 * i, generator=gen)).to(device)
    w = torch.randn(n, i, generator=gen).to(device)
    b = torch.randn(n, generator=gen).to(device) if bias else None
    y = gemv_silu_mul(x, w, b)
    assert y.shape == (1, n) and y.dtype == x.dtype
    torch.testing.assert_close(y, gemv(silu_and_mul(x), w, b), rtol=1e-6, atol=1e-5)
    gate, up = x.double().chunk(2, dim=-1)
    ref = (F.silu(gate) * up) @ w.double().T + (b.double() if bias else 0)
    assert rel_err(y, ref) < 1e-5


def test_gemv_silu_mul_fp16(device):
    gen = torch.Generator().manual_seed(3)
    x = (2 * torch.randn(1, 2 * 700, generator=gen)).to(device=device, dtype=torch.float16)
    w = torch.randn(37, 700, generator=gen).to(device=device, dtype=torch.float16)
    y = gemv_silu_mul(x, w)
    assert y.dtype == torch.float16
    # Bit-identical input vector, same tiles and accumulation order as the unfused pair.
    assert torch.equal(y, gemv(silu_and_mul(x), w))
    gate, up = x.double().chunk(2, dim=-1)
    assert rel_err(y, (F.silu(gate) * up) @ w.double().T) < 3e-3


def test_gemv_prologues_reject_bad_inputs(device):
    x2, w = torch.zeros(2, 8, device=device), torch.zeros(4, 8, device=device)
    g = torch.ones(8, device=device)
    with pytest.raises(AssertionError, match="one row"):
        gemv_rmsnorm(x2, g, 1e-6, w)
    with pytest.raises(AssertionError, match="one row"):
        gemv_silu_mul(torch.zeros(2, 16, device=device), w)
    with pytest.raises(AssertionError, match="norm_weight"):
        gemv_rmsnorm(x2[:1], torch.ones(7, device=device), 1e-6, w)
    with pytest.raises(AssertionError, match="residual"):
        gemv_rmsnorm(x2[:1], g, 1e-6, w, residual=x2[:1].half())
    with pytest.raises(AssertionError, match="weight"):
        gemv_silu_mul(torch.zeros(1, 8, device=device), w)


@pytest.mark.gpu
@pytest.mark.parametrize("n, k", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336),
                                  (128256, 4096)])
def test_gemv_bf16_llama8b_shapes(n, k, device):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, k, generator=gen).to(device=device, dtype=torch.bfloat16)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(device=device, dtype=torch.bfloat16)
    assert rel_err(gemv(x, w), x.float() @ w.float().T) < 1e-2



@pytest.mark.gpu
@pytest.mark.parametrize("n, residual", [(6144, True), (28672, False)])  # qkv, gate_up
def test_gemv_rmsnorm_bf16_llama8b_shapes(n, residual, device):
    k = 4096
    x, res, g, w, _ = _rmsnorm_inputs(n, k, torch.float32, residual, False, device)
    x, g, w = x.bfloat16(), g.bfloat16(), (w / k**0.5).bfloat16()
    res = res.bfloat16() if residual else None
    y, h = gemv_rmsnorm(x, g, 1e-5, w, residual=res)
    if residual:
        assert torch.equal(h, x + res)
    hf = h.float()
    ref = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-5) * g.float()) @ w.float().T
    assert rel_err(y, ref) < 1e-2


@pytest.mark.gpu
def test_gemv_silu_mul_bf16_llama8b_down(device):
    n, i = 4096, 14336
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2 * i, generator=gen).to(device=device, dtype=torch.bfloat16)
    w = (torch.randn(n, i, generator=gen) / i**0.5).to(device=device, dtype=torch.bfloat16)
    gate, up = x.float().chunk(2, dim=-1)
    assert rel_err(gemv_silu_mul(x, w), (F.silu(gate) * up) @ w.float().T) < 1e-2

