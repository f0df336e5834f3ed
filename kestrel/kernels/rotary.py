"""Rotary position embedding (neox style: rotate the two halves), applied in place.

Owns the rotation kernel. Must not build the cos/sin cache (the rotary layer does, including
any scaling such as llama3 or yarn); it only reads it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kestrel.kernels.utils import check_dtype, check_last_dim_contiguous, next_power_of_2


@triton.jit
def load_cos_sin(cos_sin_ptr, stride_cache_pos, pos, half, BLOCK_HALF: tl.constexpr):
    """cos and sin rows [BLOCK_HALF] of position `pos` in float32. Jit helper, shared with
    rope_store."""
    offs_d = tl.arange(0, BLOCK_HALF)
    cs_ptr = cos_sin_ptr + pos.to(tl.int64) * stride_cache_pos + offs_d
    cos = tl.load(cs_ptr, mask=offs_d < half).to(tl.float32)
    sin = tl.load(cs_ptr + half, mask=offs_d < half).to(tl.float32)
    return cos, sin


@triton.jit
def rope_pair(x1, x2, cos, sin):
    """Rotate-half of float32 halves: [x1 | x2] -> [x1 cos - x2 sin | x2 cos + x1 sin]. Jit helper,
    shared with rope_store, whose results must match these bit for bit."""
    # NOTE: explicit FMAs. Left to the backend, which product of `a * b + c * d` gets fused
    # depends on the surrounding kernel (it differed between rotary and rope_store on sm_90).
    return tl.fma(x1, cos, -(x2 * sin)), tl.fma(x2, cos, x1 * sin)


@triton.jit
def _rotate_heads(
    x_ptr,
    stride_tok,
    stride_head,
    tok,
    cos,
    sin,
    num_heads,
    half,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = (offs_h[:, None] < num_heads) & (offs_d[None, :] < half)
    ptr1 = x_ptr + tok * stride_tok + offs_h[:, None] * stride_head + offs_d[None, :]
    x1 = tl.load(ptr1, mask=mask).to(tl.float32)  # [BLOCK_H, BLOCK_HALF]
    x2 = tl.load(ptr1 + half, mask=mask).to(tl.float32)
    out1, out2 = rope_pair(x1, x2, cos[None, :], sin[None, :])
    tl.store(ptr1, out1.to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(ptr1 + half, out2.to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    # pointers
    q_ptr,
    k_ptr,
    positions_ptr,
    cos_sin_ptr,
    # sizes
    num_q_heads,
    num_kv_heads,
    half,
    # strides
    stride_q_tok,
    stride_q_head,
    stride_k_tok,
    stride_k_head,
    stride_cache_pos,
    # meta
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + tok)
    cos, sin = load_cos_sin(cos_sin_ptr, stride_cache_pos, pos, half, BLOCK_HALF)  # [BLOCK_HALF]
    _rotate_heads(
        q_ptr, stride_q_tok, stride_q_head, tok, cos, sin, num_q_heads, half, BLOCK_HQ, BLOCK_HALF
    )
    _rotate_heads(
        k_ptr, stride_k_tok, stride_k_head, tok, cos, sin, num_kv_heads, half, BLOCK_HK, BLOCK_HALF
    )


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
) -> None:
    """Rotate q and k in place (neox style) at their token positions.

    Args:
        q: [num_tokens, num_q_heads, head_dim], head_dim contiguous (may be a view of a fused
            qkv output).
        k: [num_tokens, num_kv_heads, head_dim], head_dim contiguous.
        positions: [num_tokens] int64 (or int32) absolute positions.
        cos_sin_cache: [max_position, rotary_dim], contiguous rows: cos in the first
            rotary_dim // 2 columns, sin in the rest. Only the first rotary_dim of head_dim
            are rotated (rotary_dim <= head_dim, even).
    """
    assert q.dim() == 3 and k.dim() == 3, f"q {tuple(q.shape)}, k {tuple(k.shape)}"
    num_tokens, num_q_heads, head_dim = q.shape
    assert k.shape[0] == num_tokens and k.shape[2] == head_dim, f"k {tuple(k.shape)}"
    assert positions.shape == (num_tokens,), f"positions {tuple(positions.shape)}"
    rotary_dim = cos_sin_cache.shape[1]
    assert rotary_dim % 2 == 0 and rotary_dim <= head_dim, f"rotary_dim {rotary_dim}"
    for name, t in (("q", q), ("k", k), ("cos_sin_cache", cos_sin_cache)):
        check_dtype(name, t)
        check_last_dim_contiguous(name, t)
    if num_tokens == 0:
        return
    _rotary_kernel[(num_tokens,)](
        q,
        k,
        positions,
        cos_sin_cache,
        num_q_heads,
        k.shape[1],
        rotary_dim // 2,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos_sin_cache.stride(0),
        BLOCK_HQ=next_power_of_2(num_q_heads),
        BLOCK_HK=next_power_of_2(k.shape[1]),
        BLOCK_HALF=next_power_of_2(rotary_dim // 2),
        num_warps=4,
    )
