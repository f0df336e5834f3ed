from __future__ import annotations

import pytest
import torch

from kestrel.kernels.rotary import apply_rotary
from tests.kernels.paged_refs import rel_err


def _cos_sin_cache(max_pos: int, rotary_dim: int, base: float = 10000.0) -> torch.Tensor:
    inv_freq = base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    freqs = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).float()  # [max_pos, rotary_dim]


def _reference(x: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    rotary_dim = cache.shape[1]
    cos, sin = cache[positions].double().chunk(2, dim=-1)  # [T, rotary_dim // 2]
    cos = torch.cat([cos, cos], dim=-1)[:, None, :]
    sin = torch.cat([sin, sin], dim=-1)[:, None, :]
    rot, rest = x.double()[..., :rotary_dim], x.double()[..., rotary_dim:]
    x1, x2 = rot.chunk(2, dim=-1)
    rotated = rot * cos + torch.cat([-x2, x1], dim=-1) * sin
    return torch.cat([rotated, rest], dim=-1)


@pytest.mark.parametrize("head_dim,rotary_dim", [(16, 16), (32, 16), (24, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotary_in_place_matches_reference(head_dim, rotary_dim, dtype, device):
    gen = torch.Generator().manual_seed(head_dim + rotary_dim)
    num_tokens, num_q_heads, num_kv_heads = 11, 6, 2
    # q and k as views of a fused qkv projection, like the attention layer produces.
    qkv = torch.randn(num_tokens, (num_q_heads + 2 * num_kv_heads) * head_dim, generator=gen)
    qkv = qkv.to(dtype=dtype, device=device)
    q = qkv[:, : num_q_heads * head_dim].view(num_tokens, num_q_heads, head_dim)
    k = qkv[:, num_q_heads * head_dim : (num_q_heads + num_kv_heads) * head_dim].view(
        num_tokens, num_kv_heads, head_dim
    )
    v_before = qkv[:, (num_q_heads + num_kv_heads) * head_dim :].clone()
    positions = torch.randint(0, 4000, (num_tokens,), generator=gen).to(device)
    positions[0] = 0
    cache = _cos_sin_cache(4096, rotary_dim).to(device)
    q_ref, k_ref = _reference(q, positions, cache), _reference(k, positions, cache)
    apply_rotary(q, k, positions, cache)
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    assert rel_err(q, q_ref) < tol and rel_err(k, k_ref) < tol
    assert torch.equal(qkv[:, (num_q_heads + num_kv_heads) * head_dim :], v_before)  # v untouched


@pytest.mark.gpu
def test_rotary_bf16_real_shapes(device):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(4096, 32, 128, generator=gen).to(dtype=torch.bfloat16, device=device)
    k = torch.randn(4096, 8, 128, generator=gen).to(dtype=torch.bfloat16, device=device)
    positions = torch.randint(0, 32768, (4096,), generator=gen).to(device)
    cache = _cos_sin_cache(32768, 128).to(device)
    q_ref, k_ref = _reference(q, positions, cache), _reference(k, positions, cache)
    apply_rotary(q, k, positions, cache)
    assert rel_err(q, q_ref) < 1e-2 and rel_err(k, k_ref) < 1e-2
