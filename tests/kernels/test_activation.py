from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kestrel.kernels.activation import silu_and_mul
from tests.kernels.paged_refs import rel_err


@pytest.mark.parametrize("intermediate", [64, 1500])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_silu_and_mul_matches_torch(intermediate, dtype, device):
    gen = torch.Generator().manual_seed(intermediate)
    x = (2 * torch.randn(7, 2 * intermediate, generator=gen)).to(dtype=dtype, device=device)
    out = silu_and_mul(x)
    gate, up = x.float().chunk(2, dim=-1)
    ref = F.silu(gate) * up
    assert out.shape == (7, intermediate) and out.dtype == dtype
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < (1e-6 if dtype == torch.float32 else 2e-3)


@pytest.mark.gpu
def test_silu_and_mul_bf16_real_shapes(device):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 2 * 14336, generator=gen).to(dtype=torch.bfloat16, device=device)
    gate, up = x.chunk(2, dim=-1)
    assert rel_err(silu_and_mul(x), F.silu(gate.float()) * up.float()) < 1e-2
