from __future__ import annotations

import pytest
import torch

from kestrel.kernels.gemv import MAX_ROWS, gemv
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


@pytest.mark.gpu
@pytest.mark.parametrize("n, k", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336),
                                  (128256, 4096)])
def test_gemv_bf16_llama8b_shapes(n, k, device):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, k, generator=gen).to(device=device, dtype=torch.bfloat16)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(device=device, dtype=torch.bfloat16)
    assert rel_err(gemv(x, w), x.float() @ w.float().T) < 1e-2
