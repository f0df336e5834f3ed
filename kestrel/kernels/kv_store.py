"""Write this step's K/V rows into the paged KV cache by slot.

Owns the scatter of new keys/values into `kv_cache[2, num_blocks, block_size, num_kv_heads,
head_dim]`. Must not decide slots (the runner does) or read the cache back.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kestrel.kernels.utils import check_dtype, check_last_dim_contiguous, next_power_of_2


@triton.jit
def slot_address(cache_ptr, slot, block_size, stride_c_block, stride_c_slot):
    """Address of flat slot `slot` (int64, so large block ids cannot overflow) in one paged
    cache: block slot // block_size, row slot % block_size. Jit helper, shared with rope_store."""
    return cache_ptr + (slot // block_size) * stride_c_block + (slot % block_size) * stride_c_slot


@triton.jit
def _kv_store_kernel(
    # pointers
    k_ptr,
    v_ptr,
    cache_ptr,
    slot_mapping_ptr,
    # sizes
    block_size,
    # strides
    stride_k_tok,
    stride_k_head,
    stride_v_tok,
    stride_v_head,
    stride_c_kv,
    stride_c_block,
    stride_c_slot,
    stride_c_head,
    # meta
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)
    if slot < 0:  # padding row: nothing to store
        return

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)

    # [BLOCK_H, BLOCK_D] tiles of one token
    k = tl.load(
        k_ptr + tok * stride_k_tok + offs_h[:, None] * stride_k_head + offs_d[None, :], mask=mask
    )
    v = tl.load(
        v_ptr + tok * stride_v_tok + offs_h[:, None] * stride_v_head + offs_d[None, :], mask=mask
    )
    dst = slot_address(cache_ptr, slot, block_size, stride_c_block, stride_c_slot)
    dst += offs_h[:, None] * stride_c_head + offs_d[None, :]
    tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_c_kv, v.to(cache_ptr.dtype.element_ty), mask=mask)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter new keys and values into the paged cache, in place.

    Args:
        k, v: [num_tokens, num_kv_heads, head_dim], head_dim contiguous.
        kv_cache: [2, num_blocks, block_size, num_kv_heads, head_dim] (0 = K, 1 = V),
            head_dim contiguous; values are cast to its dtype.
        slot_mapping: [num_tokens] int64; row i goes to flat slot
            `block * block_size + offset`; -1 skips the row (padding).
    """
    num_tokens, num_kv_heads, head_dim = k.shape
    assert v.shape == k.shape, f"k {tuple(k.shape)} vs v {tuple(v.shape)}"
    assert kv_cache.dim() == 5 and kv_cache.shape[0] == 2, f"kv_cache {tuple(kv_cache.shape)}"
    assert kv_cache.shape[3:] == (num_kv_heads, head_dim), (
        f"kv_cache {tuple(kv_cache.shape)} vs k {tuple(k.shape)}"
    )
    assert slot_mapping.shape == (num_tokens,), f"slot_mapping {tuple(slot_mapping.shape)}"
    assert slot_mapping.dtype in (torch.int64, torch.int32)
    for name, t in (("k", k), ("v", v), ("kv_cache", kv_cache)):
        check_dtype(name, t)
        check_last_dim_contiguous(name, t)
    if num_tokens == 0:
        return
    block_h = next_power_of_2(num_kv_heads)
    block_d = next_power_of_2(head_dim)
    _kv_store_kernel[(num_tokens,)](
        k,
        v,
        kv_cache,
        slot_mapping,
        kv_cache.shape[2],
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        num_warps=4 if block_h * block_d <= 4096 else 8,
    )
