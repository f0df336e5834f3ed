"""Per-head q/k RMSNorm (optional), rotary embedding and the K/V cache store in one launch.

Owns the fused kernel that turns one layer's qkv projection output into rotated q (in place)
and this step's K/V rows in the paged cache. Must not build the cos/sin table (the rotary layer
does), decide slots (the runner does) or read the cache back (attention does).

Its results equal, bit for bit, the unfused sequence q_norm / k_norm (kernels/norm.py), rotary
(kernels/rotary.py) and store_kv (kernels/kv_store.py): it calls their jit helpers for the
math, reduces each head as a row of the norm kernel does, and rounds at the same points.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kestrel.kernels.kv_store import slot_address
from kestrel.kernels.norm import rms_scale, row_num_warps
from kestrel.kernels.rotary import load_cos_sin, rope_pair
from kestrel.kernels.utils import (
    cdiv,
    check_dtype,
    check_last_dim_contiguous,
    next_power_of_2,
    num_sms,
    pdl_options,
    pdl_wait,
)


@triton.jit
def _load_normed(src, offs, mask, inv, w_ptr, HAS_NORM: tl.constexpr, dtype: tl.constexpr):
    """Entries `offs` of one head; with HAS_NORM, normed and rounded as rms_norm's output."""
    x = tl.load(src + offs, mask=mask, other=0.0)
    if HAS_NORM:
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        x = rms_scale(x.to(tl.float32), inv, w, dtype).to(dtype)
    return x


# NOTE: positions and slot_mapping are scalar loads; like the attention metadata they may be
# views into step buffers, so their alignment is not specialized (no recompile mid-serving).
# Nothing else passed here changes between steps: the token count only sizes the grid, and
# tokens_per_program is not specialized (1 vs more would be two variants).
@triton.jit(
    do_not_specialize=["num_tokens", "tokens_per_program"],
    do_not_specialize_on_alignment=["positions_ptr", "slot_mapping_ptr"],
)
def _rope_store_kernel(
    # pointers
    qkv_ptr,
    positions_ptr,
    cos_sin_ptr,
    cache_ptr,
    slot_mapping_ptr,
    q_norm_ptr,
    k_norm_ptr,
    # sizes
    num_tokens,
    tokens_per_program,
    num_q_heads,
    num_kv_heads,
    head_dim,
    half,
    block_size,
    eps,
    # strides
    stride_qkv_tok,
    stride_pos,
    stride_cs_pos,
    stride_c_kv,
    stride_c_block,
    stride_c_slot,
    stride_c_head,
    # meta
    HAS_NORM: tl.constexpr,
    PARTIAL: tl.constexpr,  # rotary_dim < head_dim: the tail is normed/copied, not rotated
    BLOCK_D: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    HEADS: tl.constexpr,  # heads per program, one per tile row
    WRITE_K: tl.constexpr,  # also write rotated k back in place (prefill reads it from there)
    USE_PDL: tl.constexpr,
):
    pdl_wait(USE_PDL)
    # One program per (run of tokens, group of HEADS heads): heads [0, Hq) are q heads,
    # [Hq, Hq + Hkv) kv heads. Each head is a tile row reduced by its own warps, as one row of
    # the norm kernel. Long prefill batches give a program several tokens: small programs
    # finish faster than an SM can start new ones.
    h0 = tl.program_id(1) * HEADS
    first = tl.program_id(0).to(tl.int64) * tokens_per_program
    for tok in range(first, tl.minimum(first + tokens_per_program, num_tokens)):
        _rope_store_heads(
            qkv_ptr, positions_ptr, cos_sin_ptr, cache_ptr, slot_mapping_ptr, q_norm_ptr,
            k_norm_ptr, tok, h0, num_q_heads, num_kv_heads, head_dim, half, block_size, eps,
            stride_qkv_tok, stride_pos, stride_cs_pos, stride_c_kv, stride_c_block,
            stride_c_slot, stride_c_head, HAS_NORM, PARTIAL, BLOCK_D, BLOCK_HALF, HEADS, WRITE_K,
        )


@triton.jit
def _rope_store_heads(
    qkv_ptr, positions_ptr, cos_sin_ptr, cache_ptr, slot_mapping_ptr, q_norm_ptr, k_norm_ptr,
    tok, h0, num_q_heads, num_kv_heads, head_dim, half, block_size, eps, stride_qkv_tok,
    stride_pos, stride_cs_pos, stride_c_kv, stride_c_block, stride_c_slot, stride_c_head,
    HAS_NORM: tl.constexpr, PARTIAL: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_HALF: tl.constexpr, HEADS: tl.constexpr, WRITE_K: tl.constexpr,
):
    """Heads h0 .. h0 + HEADS - 1 of one token, all q or all kv heads, one per tile row: norm,
    rotate, then q in place or k/v into the cache (with WRITE_K, k in place too)."""
    is_kv = h0 >= num_q_heads
    slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)
    dtype = qkv_ptr.dtype.element_ty
    heads = h0 + tl.arange(0, HEADS)
    # [HEADS, 1] head starts; k heads follow q heads in a row.
    src = (qkv_ptr + tok * stride_qkv_tok + heads * head_dim)[:, None]

    inv = 0.0
    w_ptr = q_norm_ptr
    if HAS_NORM:
        offs_d = tl.arange(0, BLOCK_D)[None, :]
        x = tl.load(src + offs_d, mask=offs_d < head_dim, other=0.0).to(tl.float32)
        # rms_inv per row: each row reduces as one row of the norm kernel does.
        inv = tl.rsqrt(tl.sum(x * x, axis=1) / head_dim + eps)[:, None]
        if is_kv:
            w_ptr = k_norm_ptr

    # Rotate-half on registers: reload the two halves (cache hits) rather than permute x.
    offs_h = tl.arange(0, BLOCK_HALF)[None, :]
    mask_h = offs_h < half
    x1 = _load_normed(src, offs_h, mask_h, inv, w_ptr, HAS_NORM, dtype)
    x2 = _load_normed(src, offs_h + half, mask_h, inv, w_ptr, HAS_NORM, dtype)
    pos = tl.load(positions_ptr + tok * stride_pos)
    cos, sin = load_cos_sin(cos_sin_ptr, stride_cs_pos, pos, half, BLOCK_HALF)
    out1, out2 = rope_pair(x1.to(tl.float32), x2.to(tl.float32), cos[None, :], sin[None, :])
    out1 = out1.to(dtype)  # rounded to the activation dtype, as rotary's in-place store does
    out2 = out2.to(dtype)

    offs_r = tl.arange(0, BLOCK_D)[None, :]
    mask_r = (offs_r >= 2 * half) & (offs_r < head_dim)
    if is_kv:
        if slot >= 0:  # a padding row's k/v are never read (its q still is)
            c_dtype = cache_ptr.dtype.element_ty
            dst = slot_address(cache_ptr, slot, block_size, stride_c_block, stride_c_slot)
            dst = (dst + (heads - num_q_heads) * stride_c_head)[:, None]
            tl.store(dst + offs_h, out1.to(c_dtype), mask=mask_h)
            tl.store(dst + half + offs_h, out2.to(c_dtype), mask=mask_h)
            if PARTIAL:
                rest = _load_normed(src, offs_r, mask_r, inv, w_ptr, HAS_NORM, dtype)
                tl.store(dst + offs_r, rest.to(c_dtype), mask=mask_r)
            # v head j sits num_kv_heads heads after k head j; it is only copied.
            offs_d = tl.arange(0, BLOCK_D)[None, :]
            mask_d = offs_d < head_dim
            v = tl.load(src + num_kv_heads * head_dim + offs_d, mask=mask_d)
            tl.store(dst + stride_c_kv + offs_d, v.to(c_dtype), mask=mask_d)
        if WRITE_K:  # after the cache store, which reloads the unrotated tail from src
            _store_in_place(src, out1, out2, offs_h, mask_h, offs_r, mask_r, inv, w_ptr, half,
                            HAS_NORM, PARTIAL, dtype)
    else:
        _store_in_place(src, out1, out2, offs_h, mask_h, offs_r, mask_r, inv, w_ptr, half,
                        HAS_NORM, PARTIAL, dtype)


@triton.jit
def _store_in_place(src, out1, out2, offs_h, mask_h, offs_r, mask_r, inv, w_ptr, half,
                    HAS_NORM: tl.constexpr, PARTIAL: tl.constexpr, dtype: tl.constexpr):
    """The rotated (and normed) heads over their qkv rows."""
    tl.store(src + offs_h, out1, mask=mask_h)
    tl.store(src + half + offs_h, out2, mask=mask_h)
    if PARTIAL and HAS_NORM:  # without the norm the unrotated tail is already final
        rest = _load_normed(src, offs_r, mask_r, inv, w_ptr, HAS_NORM, dtype)
        tl.store(src + offs_r, rest, mask=mask_r)


def heads_per_program(num_q_heads: int, num_kv_heads: int) -> int:
    """Heads in one program's tile: a power of two up to 8 that divides both head counts, so
    a tile holds q heads only or kv heads only."""
    n = 8
    while num_q_heads % n or num_kv_heads % n:
        n //= 2
    return n


def tokens_per_program(num_tokens: int, warps_per_token: int, device: torch.device) -> int:
    """Tokens each program handles: one until the grid is ~4 waves of full SMs (64 warps),
    then more (at most 16)."""
    return max(1, min(16, cdiv(num_tokens * warps_per_token, num_sms(device) * 64 * 4)))


def rope_store_kv(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    tokens_per_prog: int | None = None,
    write_k: bool = False,
) -> torch.Tensor:
    """Norm (optional), rotate and store one layer's qkv in a single launch.

    Equals: q, k, v = split(qkv); with norm weights q, k = rms_norm(q), rms_norm(k) per head;
    apply_rotary(q, k); store_kv(k, v, kv_cache, slot_mapping).

    Args:
        qkv: [T, (num_q_heads + 2 * num_kv_heads) * head_dim], last dim contiguous: the qkv
            projection output. Its q part is overwritten with the result; its k part too with
            `write_k`, else k and v are left unchanged (callers must treat them as unspecified).
        positions: [T] int64 (or int32) absolute positions.
        cos_sin_cache: [max_position, rotary_dim] float32, cos | sin halves; the first
            rotary_dim (even, <= head_dim) dims of each head are rotated (neox style).
        kv_cache: [2, num_blocks, block_size, num_kv_heads, head_dim] (0 = K, 1 = V), head_dim
            contiguous; k and v are cast to its dtype.
        slot_mapping: [T] int64 (or int32) flat slots `block * block_size + offset`; -1 marks
            a padding row whose k/v are not stored (its q is still rotated).
        q_norm_weight, k_norm_weight: [head_dim] per-head RMSNorm weights (Qwen3), both or
            neither.
        eps: RMSNorm epsilon (ignored without weights).
        tokens_per_prog: tokens per program (default: `tokens_per_program`); results do not
            depend on it.
        write_k: also leave the rotated k in qkv, equal to the cache's copy when the dtypes
            match, so prefill attention can read this step's keys from there.

    Returns:
        q: [T, num_q_heads, head_dim], a view of qkv.
    """
    assert qkv.dim() == 2, f"qkv must be [num_tokens, width], got {tuple(qkv.shape)}"
    num_tokens = qkv.shape[0]
    q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
    assert qkv.shape[1] == q_size + 2 * kv_size, (
        f"qkv {tuple(qkv.shape)} vs {num_q_heads} q + 2 x {num_kv_heads} kv heads of {head_dim}"
    )
    assert positions.shape == (num_tokens,), f"positions {tuple(positions.shape)}"
    assert positions.dtype in (torch.int64, torch.int32), f"positions dtype {positions.dtype}"
    assert slot_mapping.shape == (num_tokens,), f"slot_mapping {tuple(slot_mapping.shape)}"
    assert slot_mapping.dtype in (torch.int64, torch.int32), f"slots dtype {slot_mapping.dtype}"
    assert slot_mapping.is_contiguous(), f"slot_mapping strides {slot_mapping.stride()}"
    assert cos_sin_cache.dim() == 2, f"cos_sin_cache {tuple(cos_sin_cache.shape)}"
    rotary_dim = cos_sin_cache.shape[1]
    assert rotary_dim % 2 == 0 and 0 < rotary_dim <= head_dim, (
        f"rotary_dim {rotary_dim} must be even and <= head_dim {head_dim}"
    )
    assert kv_cache.dim() == 5 and kv_cache.shape[0] == 2, f"kv_cache {tuple(kv_cache.shape)}"
    assert kv_cache.shape[3:] == (num_kv_heads, head_dim), (
        f"kv_cache {tuple(kv_cache.shape)} vs {num_kv_heads} kv heads of {head_dim}"
    )
    for name, t in (("qkv", qkv), ("cos_sin_cache", cos_sin_cache), ("kv_cache", kv_cache)):
        check_dtype(name, t)
        check_last_dim_contiguous(name, t)
    has_norm = q_norm_weight is not None
    assert has_norm == (k_norm_weight is not None), "pass both q and k norm weights or neither"
    if has_norm:
        for name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
            assert w.shape == (head_dim,), f"{name} {tuple(w.shape)} vs head_dim {head_dim}"
            assert w.is_contiguous(), f"{name} must be contiguous"
    else:
        q_norm_weight = k_norm_weight = qkv  # unused by the kernel

    q = qkv[:, :q_size].view(num_tokens, num_q_heads, head_dim)
    if num_tokens == 0:
        return q
    block_d = next_power_of_2(head_dim)
    group = heads_per_program(num_q_heads, num_kv_heads)
    heads = (num_q_heads + num_kv_heads) // group
    warps = group * row_num_warps(block_d)  # the norm kernel's warps per row of head_dim
    per = tokens_per_prog or tokens_per_program(num_tokens, heads * warps, qkv.device)
    _rope_store_kernel[(cdiv(num_tokens, per), heads)](
        qkv,
        positions,
        cos_sin_cache,
        kv_cache,
        slot_mapping,
        q_norm_weight,
        k_norm_weight,
        num_tokens,
        per,
        num_q_heads,
        num_kv_heads,
        head_dim,
        rotary_dim // 2,
        kv_cache.shape[2],
        float(eps),
        qkv.stride(0),
        positions.stride(0),
        cos_sin_cache.stride(0),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        HAS_NORM=has_norm,
        PARTIAL=rotary_dim < head_dim,
        BLOCK_D=block_d,
        BLOCK_HALF=next_power_of_2(rotary_dim // 2),
        HEADS=group,
        WRITE_K=write_k,
        num_warps=warps,
        USE_PDL=bool(pdl := pdl_options(qkv.device)),
        **pdl,
    )
    return q
