"""Paged decode attention: one query token per request, split-KV ("flash-decoding").

Owns the decode kernel and the choice of how many KV splits to use. Each program handles one
(request, kv head, split): the GQA group of query heads that share that kv head is packed into
the rows of one tile, so every K/V byte is read once per step. Splits write partial
(out, lse) that `merge_states` combines; with one split the kernel writes the output directly.
Must not write the KV cache (kv_store does) or handle queries longer than one token.

Split layout for one request of seq_len tokens: each request divides its own context, so a
short request next to long ones (or under a CUDA graph sized for max_model_len) still spreads
over the splits; S = cdiv(seq_len, num_splits) rounded up to a multiple of BLOCK_N:

    keys:   [0 ...... S)[S ..... 2S)[2S .. seq_len)   [empty splits: lse = -inf]
    split:        0           1            2                  3 ... num_splits-1
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kestrel.kernels.attention.merge_states import merge_states
from kestrel.kernels.utils import (
    cdiv,
    check_dtype,
    check_last_dim_contiguous,
    is_interpreter,
    next_power_of_2,
    num_sms,
    pdl_options,
    pdl_wait,
)

_LOG2E = 1.4426950408889634


# The in-kernel merge reads the splits one after another; past a few splits the separate
# merge kernel, which reads them all at once, is faster (one H100, Llama-3-8B at batch 1 with
# 33 splits: 5.85 ms/token merging in the kernel, 5.56 with the merge kernel).
FUSED_MERGE_MAX_SPLITS = 4


class DecodeConfig(NamedTuple):
    block_n: int  # keys per inner tile
    num_warps: int
    num_stages: int


# NOTE: block tables come in more than one width (graph buffers, step staging); the row
# stride is only an offset, so it is not specialized (no variant compiled mid-serving).
@triton.jit(do_not_specialize=["stride_bt_req"])
def _decode_kernel(
    # pointers
    q_ptr,
    cache_ptr,
    block_table_ptr,
    seq_lens_ptr,
    order_ptr,
    out_ptr,
    lse_ptr,
    final_ptr,
    sem_ptr,
    # sizes
    qk_scale,
    # strides
    stride_q_tok,
    stride_q_head,
    stride_c_kv,
    stride_c_block,
    stride_c_slot,
    stride_c_head,
    stride_bt_req,
    stride_o_tok,
    stride_o_head,
    stride_o_split,
    stride_l_tok,
    stride_l_head,
    stride_l_split,
    stride_f_tok,
    stride_f_head,
    # meta
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    HAS_ORDER: tl.constexpr,
    FUSED_MERGE: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_wait(USE_PDL)
    # NOTE: kv heads are the fastest grid dim, so programs start request by request; with an
    # order by decreasing context, the last programs to start are the shortest (a short tail).
    kv_head = tl.program_id(0)
    if HAS_ORDER:
        req = tl.load(order_ptr + tl.program_id(1)).to(tl.int64)
    else:
        req = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + offs_g  # [BLOCK_G] query heads of this kv head
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    lse_ptrs = lse_ptr + req * stride_l_tok + heads * stride_l_head + split * stride_l_split

    seq_len = tl.load(seq_lens_ptr + req)
    tokens_per_split = tl.cdiv(tl.cdiv(seq_len, tl.num_programs(2)), BLOCK_N) * BLOCK_N
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, seq_len)
    out_ptrs = (
        out_ptr
        + req * stride_o_tok
        + heads[:, None] * stride_o_head
        + split * stride_o_split
        + offs_d[None, :]
    )
    out_mask = g_mask[:, None] & d_mask[None, :]
    q = tl.load(
        q_ptr + req * stride_q_tok + heads[:, None] * stride_q_head + offs_d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # [BLOCK_G, BLOCK_D]
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    bt_row = block_table_ptr + req * stride_bt_req
    head_off = kv_head * stride_c_head

    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        block = tl.load(bt_row + offs_n // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
        row_off = block * stride_c_block + (offs_n % PAGE_SIZE) * stride_c_slot + head_off
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(cache_ptr + row_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # [BLOCK_G, BLOCK_N], log2 units
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            cache_ptr + stride_c_kv + row_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    # An empty split (or a padded request with seq_len 0) saw no key: out = 0, lse = -inf.
    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    out = tl.where(seen[:, None], acc / l_safe[:, None], 0.0)
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=out_mask)
    # lse in natural log: m_i and log2(l_i) are in log2 units.
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    tl.store(lse_ptrs, lse, mask=g_mask)
    if FUSED_MERGE:
        # The last split of (request, kv head) to finish merges them all: no merge launch.
        # Every thread's partial stores precede the barrier; the release atomic publishes them.
        tl.debug_barrier()
        sem = sem_ptr + req * tl.num_programs(0) + kv_head
        if tl.atomic_add(sem, 1, sem="acq_rel", scope="gpu") == tl.num_programs(2) - 1:
            _merge_splits(
                out_ptr + req * stride_o_tok + heads[:, None] * stride_o_head + offs_d[None, :],
                lse_ptr + req * stride_l_tok + heads * stride_l_head,
                final_ptr + req * stride_f_tok + heads[:, None] * stride_f_head + offs_d[None, :],
                stride_o_split, stride_l_split, g_mask, out_mask, BLOCK_G, BLOCK_D,
            )
            tl.atomic_xchg(sem, 0)  # ready for the next launch (e.g. a graph replay)


@triton.jit
def _merge_splits(out_ptrs, lse_ptrs, final_ptrs, stride_o_split, stride_l_split, g_mask,
                  out_mask, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    """merge_states for one (request, kv head group), in split order: online LSE weights."""
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    w_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for split in range(0, tl.num_programs(2)):
        # .cg: other SMs wrote these, so read them from L2, never from a stale L1 line.
        lse = tl.load(lse_ptrs + split * stride_l_split, mask=g_mask, other=float("-inf"),
                      cache_modifier=".cg")
        m_new = tl.maximum(m, lse)
        shift = tl.where(m_new > float("-inf"), m_new, 0.0)
        alpha = tl.exp(m - shift)
        w = tl.exp(lse - shift)  # 0 for an empty split
        # Not masked by lse (no wait on it); an empty split's out may be garbage: selected out.
        part = tl.load(out_ptrs + split * stride_o_split, mask=out_mask, other=0.0,
                       cache_modifier=".cg")
        part = tl.where((lse > float("-inf"))[:, None], part.to(tl.float32), 0.0)
        acc = acc * alpha[:, None] + w[:, None] * part
        w_sum = w_sum * alpha + w
        m = m_new
    out = acc / tl.maximum(w_sum, 1e-30)[:, None]
    tl.store(final_ptrs, out.to(final_ptrs.dtype.element_ty), mask=out_mask)


def default_decode_config(device: torch.device, head_dim: int, num_reqs: int = 1) -> DecodeConfig:
    """From sweeps on one H100 (head_dim 128): 64-key tiles; from 128 requests on, 128-key
    tiles read mixed 100-2K contexts 0.3-3% faster (batch 256: 2.91-2.95 TB/s). Below that
    they tie on mixed contexts and lose on long uniform ones (batch 64 x 4K: 2.75 vs 2.92
    TB/s): 3 stages of 128 keys hold one program per SM, 64 keys two."""
    if is_interpreter(device):
        return DecodeConfig(block_n=16, num_warps=4, num_stages=1)
    return DecodeConfig(block_n=128 if num_reqs >= 128 else 64, num_warps=4, num_stages=3)


def choose_num_splits(num_reqs: int, num_kv_heads: int, device: torch.device) -> int:
    """Splits per request so the grid fills the GPU: about two programs per SM (H100, batch
    64 x 8 kv heads x 4K context: one split ran at 2.92 TB/s, two at 2.86), at most 64.

    It depends on the batch shape only, not on context lengths: each request divides its own
    context (a short one leaves trailing splits empty, and they exit at once), so a step and
    its CUDA-graph replay split alike.
    """
    programs = max(num_reqs * num_kv_heads, 1)
    return max(min(cdiv(2 * num_sms(device), programs), 64), 1)


def decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    config: DecodeConfig | None = None,
    order: torch.Tensor | None = None,
    semaphores: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one new query per request over its paged context (keys 0..seq_len-1).

    Args:
        q: [num_reqs, num_q_heads, head_dim], head_dim contiguous; row r is request r.
        kv_cache: [2, num_blocks, block_size, num_kv_heads, head_dim], head_dim contiguous,
            already holding this step's keys/values.
        block_table: [num_reqs, max_blocks_per_req] int32.
        seq_lens: [num_reqs] int32, context length incl. the query token (0 gives out = 0).
        scale: softmax scale.
        num_splits: KV splits per request (fixed for CUDA graphs); default from batch shape.
        out: optional [num_reqs, num_q_heads, head_dim] output buffer.
        order: optional [num_reqs] permutation of the requests (e.g. by decreasing seq_len),
            the order their programs are launched in; results do not depend on it.
        semaphores: optional zeroed int32 scratch of at least num_reqs * num_kv_heads
            entries, left zeroed: with it and at most FUSED_MERGE_MAX_SPLITS splits, the
            last split of each request merges the splits in the kernel instead of a
            separate merge launch.

    Returns:
        [num_reqs, num_q_heads, head_dim] in q.dtype.
    """
    num_reqs, num_q_heads, head_dim = q.shape
    _, _, page_size, num_kv_heads, cache_head_dim = kv_cache.shape
    assert kv_cache.shape[0] == 2 and cache_head_dim == head_dim, f"kv_cache {kv_cache.shape}"
    assert num_q_heads % num_kv_heads == 0, f"{num_q_heads} q heads vs {num_kv_heads} kv heads"
    assert block_table.dim() == 2 and block_table.shape[0] == num_reqs
    assert seq_lens.shape == (num_reqs,)
    assert order is None or order.shape == (num_reqs,), f"order {tuple(order.shape)}"
    for name, t in (("q", q), ("kv_cache", kv_cache)):
        check_dtype(name, t)
        check_last_dim_contiguous(name, t)
    assert block_table.stride(1) == 1
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape
    check_last_dim_contiguous("out", out)
    if num_reqs == 0:
        return out

    cfg = config or default_decode_config(q.device, head_dim, num_reqs)
    if num_splits is None:
        num_splits = choose_num_splits(num_reqs, num_kv_heads, q.device)
    group = num_q_heads // num_kv_heads
    lse = torch.empty(num_reqs, num_q_heads, num_splits, dtype=torch.float32, device=q.device)
    if num_splits == 1:
        dst, dst_split_stride = out, 0  # [num_reqs, num_q_heads, head_dim], written directly
    else:
        # [num_reqs, num_q_heads, num_splits, head_dim] float32 partials
        dst = torch.empty(
            num_reqs, num_q_heads, num_splits, head_dim, dtype=torch.float32, device=q.device
        )
        dst_split_stride = dst.stride(2)

    fused_merge = 1 < num_splits <= FUSED_MERGE_MAX_SPLITS and semaphores is not None
    if fused_merge:
        assert semaphores.dtype == torch.int32 and semaphores.numel() >= num_reqs * num_kv_heads
    grid = (num_kv_heads, num_reqs, num_splits)
    _decode_kernel[grid](
        q,
        kv_cache,
        block_table,
        seq_lens,
        order if order is not None else seq_lens,
        dst,
        lse,
        out,
        semaphores if fused_merge else lse,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        block_table.stride(0),
        dst.stride(0),
        dst.stride(1),
        dst_split_stride,
        lse.stride(0),
        lse.stride(1),
        lse.stride(2),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        BLOCK_G=max(16, next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_D=next_power_of_2(head_dim),
        BLOCK_N=cfg.block_n,
        PAGE_SIZE=page_size,
        HAS_ORDER=order is not None,
        FUSED_MERGE=fused_merge,
        USE_PDL=bool(pdl := pdl_options(q.device)),
        **pdl,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if num_splits > 1 and not fused_merge:
        merge_states(dst, lse, out=out)
    return out
