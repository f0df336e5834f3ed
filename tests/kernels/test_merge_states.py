from __future__ import annotations

import pytest
import torch

from kestrel.kernels.attention.merge_states import merge_states
from tests.kernels.paged_refs import rel_err


def _reference(parts_out: torch.Tensor, parts_lse: torch.Tensor):
    lse = torch.logsumexp(parts_lse.double(), dim=-1)  # [T, H]
    w = torch.exp(parts_lse.double() - lse[..., None]).nan_to_num(0.0)  # [T, H, P]
    safe = torch.where(torch.isfinite(parts_lse)[..., None], parts_out.double(), 0.0)
    return (safe * w[..., None]).sum(2), lse


@pytest.mark.parametrize("num_parts", [1, 2, 5])
@pytest.mark.parametrize("head_dim", [16, 24])
def test_merge_states_matches_logsumexp(num_parts, head_dim, device):
    gen = torch.Generator().manual_seed(num_parts * 31 + head_dim)
    tokens, heads = 6, 3
    parts_out = torch.randn(tokens, heads, num_parts, head_dim, generator=gen).to(device)
    parts_lse = (4 * torch.randn(tokens, heads, num_parts, generator=gen)).to(device)
    if num_parts > 1:
        # Empty parts: lse = -inf, their out unwritten (NaN) and must not be read.
        parts_lse[0, :, 0] = -torch.inf
        parts_out[0, :, 0] = torch.nan
        parts_lse[3, 1, 1:] = -torch.inf
        parts_out[3, 1, 1:] = torch.nan
    out = torch.full((tokens, heads, head_dim), torch.nan, device=device)
    out_lse = torch.full((tokens, heads), torch.nan, device=device)
    merge_states(parts_out, parts_lse, out=out, out_lse=out_lse)
    ref, ref_lse = _reference(parts_out, parts_lse)
    assert torch.isfinite(out).all() and torch.isfinite(out_lse).all()
    assert rel_err(out, ref) < 1e-5
    assert rel_err(out_lse, ref_lse) < 1e-5


def test_merge_two_stacked_states_and_all_empty(device):
    gen = torch.Generator().manual_seed(7)
    a, b = (torch.randn(4, 2, 32, generator=gen).to(device) for _ in range(2))
    lse_a, lse_b = (torch.randn(4, 2, generator=gen).to(device) for _ in range(2))
    lse_a[2, 0] = -torch.inf  # only b holds keys for this row
    lse_b[1, 1] = -torch.inf
    lse_a[3], lse_b[3] = -torch.inf, -torch.inf  # a row with no keys at all
    parts_out = torch.stack([a, b], dim=2)  # [4, 2, 2, 32]
    parts_lse = torch.stack([lse_a, lse_b], dim=2)
    out, _ = merge_states(parts_out, parts_lse, out_dtype=torch.float16)
    ref, _ = _reference(parts_out, parts_lse)
    assert out.dtype == torch.float16
    assert rel_err(out, ref) < 1e-3
    assert torch.equal(out[3], torch.zeros_like(out[3]))
    assert torch.allclose(out[2, 0].float(), b[2, 0], atol=1e-3)
