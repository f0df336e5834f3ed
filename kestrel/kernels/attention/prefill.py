"""Varlen causal prefill/extend attention over the paged KV cache (FlashAttention-2 style).

Owns the kernel for query chunks that attend to their cached prefix plus themselves. Each
program computes BLOCK_M query rows of one query head of one request with an online softmax
over BLOCK_N-key tiles read from the cache through the block table. Must not write the cache
(kv_store runs first) or know how the batch was scheduled.

Positions for request r with q_len queries and seq_len keys (prefix = seq_len - q_len):

    keys:    [0 ............ prefix)[prefix ........... seq_len)
    queries:                        [0 ............... q_len)   query i sits at prefix + i
    tile of rows [m0, m0 + BLOCK_M): keys [0, prefix + m0 + 1) need no mask (every row sees
    them); keys up to prefix + m0 + BLOCK_M get the causal mask.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kestrel.kernels.utils import (
    cdiv,
    check_dtype,
    check_last_dim_contiguous,
    is_interpreter,
    next_power_of_2,
)

_LOG2E = 1.4426950408889634


class PrefillConfig(NamedTuple):
    block_m: int  # query rows per program
    block_n: int  # keys per inner tile
    num_warps: int
    num_stages: int


@triton.jit
def _attend_tiles(
    acc,
    l_i,
    m_i,
    q,
    cache_ptr,
    bt_row,
    head_off,
    stride_c_kv,
    stride_c_block,
    stride_c_slot,
    q_pos,
    lo,
    hi,
    kv_end,
    qk_scale,
    offs_d,
    d_mask,
    BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    CAUSAL_MASK: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    """Online-softmax update of (acc, l_i, m_i) with keys [lo, hi); m_i in log2 units."""
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < kv_end
        if CAUSAL_MASK:
            block = tl.load(bt_row + offs_n // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
        else:
            block = tl.load(bt_row + offs_n // PAGE_SIZE).to(tl.int64)
        row_off = block * stride_c_block + (offs_n % PAGE_SIZE) * stride_c_slot + head_off
        k_ptrs = cache_ptr + row_off[:, None] + offs_d[None, :]  # [BLOCK_N, BLOCK_D]
        # Unmasked tiles of a power-of-two head_dim load without predicates.
        if CAUSAL_MASK or not EVEN_D:
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        else:
            k = tl.load(k_ptrs)
        s = tl.dot(q, tl.trans(k))  # [BLOCK_M, BLOCK_N], unscaled
        if CAUSAL_MASK:
            visible = (offs_n[None, :] <= q_pos[:, None]) & n_mask[None, :]
            s = tl.where(visible, s, float("-inf"))
        # The scale folds into one FMA per score: p = exp2(s * scale - m).
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if CAUSAL_MASK or not EVEN_D:
            v = tl.load(k_ptrs + stride_c_kv, mask=kv_mask, other=0.0)
        else:
            v = tl.load(k_ptrs + stride_c_kv)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


# NOTE: mixed steps pass the metadata of the requests after the decode rows, i.e. views that
# start num_decodes entries in, and block tables come in more than one width. Triton
# specializes pointers on 16-byte alignment and integers on divisibility by 16, so each case
# would compile its own variant mid-serving; these are scalar loads and offsets anyway.
@triton.jit(
    do_not_specialize=["stride_bt_req"],
    do_not_specialize_on_alignment=["block_table_ptr", "query_start_loc_ptr", "seq_lens_ptr"],
)
def _prefill_kernel(
    # pointers
    q_ptr,
    cache_ptr,
    block_table_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    out_ptr,
    # sizes
    qk_scale,
    # strides
    stride_q_tok,
    stride_q_head,
    stride_o_tok,
    stride_o_head,
    stride_c_kv,
    stride_c_block,
    stride_c_slot,
    stride_c_head,
    stride_bt_req,
    # meta
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
):
    head = tl.program_id(0)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    # Heaviest (last) row tiles first: causal work grows with the tile index.
    m_block = tl.num_programs(1) - 1 - tl.program_id(1)
    req = tl.program_id(2)

    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    m0 = m_block * BLOCK_M
    if m0 >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    prefix = seq_len - q_len

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < q_len
    d_mask = offs_d < HEAD_DIM
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(
        q_ptr + rows[:, None] * stride_q_tok + head * stride_q_head + offs_d[None, :],
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # [BLOCK_M, BLOCK_D]
    q_pos = prefix + offs_m  # [BLOCK_M] context positions of the rows

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = block_table_ptr + req.to(tl.int64) * stride_bt_req
    head_off = (head // GROUP) * stride_c_head

    kv_end = tl.minimum(seq_len, prefix + m0 + BLOCK_M)  # past the last row's position
    full_end = ((prefix + m0 + 1) // BLOCK_N) * BLOCK_N  # tiles every row sees in full
    acc, l_i, m_i = _attend_tiles(
        acc,
        l_i,
        m_i,
        q,
        cache_ptr,
        bt_row,
        head_off,
        stride_c_kv,
        stride_c_block,
        stride_c_slot,
        q_pos,
        0,
        full_end,
        kv_end,
        qk_scale,
        offs_d,
        d_mask,
        BLOCK_N,
        PAGE_SIZE,
        False,
        EVEN_D,
    )
    acc, l_i, m_i = _attend_tiles(
        acc,
        l_i,
        m_i,
        q,
        cache_ptr,
        bt_row,
        head_off,
        stride_c_kv,
        stride_c_block,
        stride_c_slot,
        q_pos,
        full_end,
        kv_end,
        kv_end,
        qk_scale,
        offs_d,
        d_mask,
        BLOCK_N,
        PAGE_SIZE,
        True,
        EVEN_D,
    )

    out = acc / l_i[:, None]
    tl.store(
        out_ptr + rows[:, None] * stride_o_tok + head * stride_o_head + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None] & d_mask[None, :],
    )


def default_prefill_config(
    device: torch.device, head_dim: int, max_query_len: int
) -> PrefillConfig:
    """Tile shape by head_dim and chunk length (measured on H100, see benchmarks/kernels)."""
    if is_interpreter(device):
        return PrefillConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)
    if max_query_len <= 64:
        return PrefillConfig(block_m=64, block_n=64, num_warps=4, num_stages=2)
    if head_dim <= 64:
        return PrefillConfig(block_m=128, block_n=64, num_warps=4, num_stages=3)
    if max_query_len <= 512:
        return PrefillConfig(block_m=128, block_n=128, num_warps=8, num_stages=3)
    # Two warpgroups of 128 rows each: 386 TFLOP/s at 4 x 32 heads x 4096 causal.
    return PrefillConfig(block_m=256, block_n=64, num_warps=8, num_stages=3)


def prefill_reads_new_kv(kv_cache: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether `prefill_attention` (default config) reads `new_kv` for q of `dtype` over this
    cache, so a caller knows if leaving this step's rotated keys in place pays off."""
    if not kv_cache.is_cuda:
        return False
    from kestrel.kernels.attention import prefill_hopper as hopper

    return hopper.takes_hopper_cache(kv_cache, dtype)


def prefill_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    max_query_len: int,
    scale: float,
    out: torch.Tensor | None = None,
    config: PrefillConfig | None = None,
    new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Causal attention of varlen query chunks over their paged context.

    Args:
        q: [num_tokens, num_q_heads, head_dim], head_dim contiguous.
        kv_cache: [2, num_blocks, block_size, num_kv_heads, head_dim], head_dim contiguous,
            already holding this step's keys/values.
        block_table: [num_reqs, max_blocks_per_req] int32.
        query_start_loc: [num_reqs + 1] int32; request r owns q rows
            query_start_loc[r]:query_start_loc[r + 1] (absolute row indices, so a slice
            `query_start_loc[i:]` runs requests i.. against the same q/out).
        seq_lens: [num_reqs] int32, context length incl. this step's queries.
        max_query_len: host upper bound of the query lengths (sizes the grid).
        scale: softmax scale.
        out: optional [num_tokens, num_q_heads, head_dim] buffer; rows outside every request
            are left untouched.
        config: tile shape for this (portable) kernel; None also lets an sm_90 GPU take the
            Hopper kernel in prefill_hopper.py.
        new_kv: optional (k, v), [num_tokens, num_kv_heads, head_dim] each, rows aligned with
            q: this step's keys/values, equal to what the cache holds at their slots. A kernel
            may read a request's own keys from them instead of gathering pages (the Hopper
            kernel does); results are the same either way.

    Returns:
        [num_tokens, num_q_heads, head_dim] in q.dtype.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    _, _, page_size, num_kv_heads, cache_head_dim = kv_cache.shape
    num_reqs = seq_lens.shape[0]
    assert kv_cache.shape[0] == 2 and cache_head_dim == head_dim, f"kv_cache {kv_cache.shape}"
    assert num_q_heads % num_kv_heads == 0, f"{num_q_heads} q heads vs {num_kv_heads} kv heads"
    assert query_start_loc.shape == (num_reqs + 1,), f"query_start_loc {query_start_loc.shape}"
    assert block_table.dim() == 2 and block_table.shape[0] == num_reqs
    assert block_table.stride(1) == 1
    for name, t in (("q", q), ("kv_cache", kv_cache)):
        check_dtype(name, t)
        check_last_dim_contiguous(name, t)
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape
    check_last_dim_contiguous("out", out)
    if num_reqs == 0 or max_query_len == 0:
        return out
    if config is None and q.is_cuda:
        from kestrel.kernels.attention import prefill_hopper as hopper

        if hopper.takes_hopper_prefill(q, kv_cache, out):
            return hopper.hopper_prefill_attention(
                q, kv_cache, block_table, query_start_loc, seq_lens, max_query_len, scale, out,
                new_kv,
            )

    cfg = config or default_prefill_config(q.device, head_dim, max_query_len)
    grid = (num_q_heads, cdiv(max_query_len, cfg.block_m), num_reqs)
    _prefill_kernel[grid](
        q,
        kv_cache,
        block_table,
        query_start_loc,
        seq_lens,
        out,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        block_table.stride(0),
        GROUP=num_q_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_D=next_power_of_2(head_dim),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        PAGE_SIZE=page_size,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out
