"""Varlen causal prefill/extend attention over the paged KV cache for Hopper (sm_90), in Gluon.

Owns the Hopper kernel behind `prefill_attention`: same inputs, same results up to rounding as
the portable Triton kernel in prefill.py, which stays the path everywhere else (and the one the
CPU interpreter runs). Must not write the cache or know how the batch was scheduled.

Why a second kernel: the Triton one stops at ~56% of the matmul rate on an H100 because each
tile's softmax (exp2 on the MUFU, FP32 max/sum/rescale) runs after its QK^T and before its PV,
never under them. Written with explicit async warpgroup MMAs, tile j's softmax runs while the
tensor cores do tile j-1's PV (FlashAttention-3's intra-warpgroup overlap), and two 64-row
programs share an SM, so one program's softmax also runs under the other's MMAs. K/V pages come
through TMA, one box per page, into a 3-stage ring; no pointer tensors are built for the gather.

A request's own keys (this step's, passed as `new_kv` rows aligned with q) are read as one box
per 64-key tile instead of four 16-token pages: the MMA warps issue every copy, so fewer copies
and no block-table loads are time the tensor cores get back (~10% at 16-token pages). Those
steps run in a loop of their own, as a per-tile branch costs about as much again. With them, Q
sits in registers (QK^T reads only K from shared memory, which 64-key tiles otherwise
saturate); reading pages only, that measured no better.

Per program: BLOCK_M query rows of one query head of one request. Key tiles are visited from
the diagonal down, so only the first one or two (the tiles crossing the diagonal) are masked.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

BLOCK_M = 64  # query rows per program (one warpgroup, wgmma M = 64)
BLOCK_N = 64  # keys per tile
STAGES = 3  # K/V ring depth: 3 x 32 KB + 16 KB of Q at head_dim 128, two programs per SM
NUM_WARPS = 4

_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


@gluon.jit
def _softmax_tile(s, m_i, l_i, q_pos, k_pos, qk_scale, MASK: gl.constexpr):
    """Online-softmax update for one score tile: (p, alpha, m, l) with the scale folded into
    one FMA per score (qk_scale > 0, so the row max commutes with it)."""
    if MASK:
        s = gl.where(gl.expand_dims(k_pos, 0) <= gl.expand_dims(q_pos, 1), s, -float("inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
        # A row with no visible key yet keeps m = -inf; subtract 0 instead (p = alpha = 0).
        m_use = gl.where(m_new == -float("inf"), 0.0, m_new)
    else:
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
        m_use = m_new
    alpha = gl.exp2(m_i - m_use)
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_use, 1))
    l_i = l_i * alpha + gl.sum(p, axis=1)
    return p, alpha, m_new, l_i


@gluon.jit
def _kv_row(bt_row, key, last_page, ok, PAGE: gl.constexpr):
    # Pages past the context are clamped to its last page: those keys are masked, and the
    # block table holds no valid id there. int32, as TMA coordinates are.
    page = gl.minimum(key // PAGE, last_page)
    return gl.load(bt_row + page, mask=ok, other=0) * PAGE + key % PAGE


# How a step loads its key tile: from the cache's pages, from the step's own K/V rows, or
# either, decided per tile at run time (only outside the main loops: the branch costs ~5%).
PAGED = gl.constexpr(0)
OWN = gl.constexpr(1)
EITHER = gl.constexpr(2)


@gluon.jit
def _kv_rows(bt_row, t, n_tiles, last_page, t_own0, t_own1, PAGE: gl.constexpr,
             SUB: gl.constexpr, BLOCK_N: gl.constexpr, LOAD: gl.constexpr):
    """Cache rows of the t-th visited key tile (key tile n_tiles - 1 - t), one per page or
    page part (at most 4). Loaded an iteration's work before the TMA that needs them, so the
    block-table latency does not stall the MMA warps. Own-row tiles need none."""
    key0 = (n_tiles - 1 - t) * BLOCK_N
    ok = t < n_tiles
    if LOAD == EITHER:
        ok = ok & ((t < t_own0) | (t >= t_own1))
    r0 = _kv_row(bt_row, key0, last_page, ok, PAGE)
    r1 = r0
    r2 = r0
    r3 = r0
    if BLOCK_N // SUB > 1:
        r1 = _kv_row(bt_row, key0 + SUB, last_page, ok, PAGE)
    if BLOCK_N // SUB > 2:
        r2 = _kv_row(bt_row, key0 + 2 * SUB, last_page, ok, PAGE)
        r3 = _kv_row(bt_row, key0 + 3 * SUB, last_page, ok, PAGE)
    return r0, r1, r2, r3


@gluon.jit
def _load_paged(k_desc, v_desc, bar, k_dst, v_dst, rows, kv_col, ok, SUB: gl.constexpr,
                BLOCK_N: gl.constexpr):
    # One [SUB, head_dim] box per entry of `rows`.
    for i in gl.static_range(BLOCK_N // SUB):
        tma.async_copy_global_to_shared(k_desc, [rows[i], kv_col], bar,
                                        k_dst.slice(i * SUB, SUB), pred=ok)
        tma.async_copy_global_to_shared(v_desc, [rows[i], kv_col], bar,
                                        v_dst.slice(i * SUB, SUB), pred=ok)


@gluon.jit
def _load_kv(k_desc, v_desc, kn_desc, vn_desc, bars, k_smem, v_smem, rows, t, n_tiles, kv_col,
             t_own0, t_own1, own_row0, SUB: gl.constexpr, BLOCK_N: gl.constexpr,
             STAGES: gl.constexpr, LOAD: gl.constexpr):
    """TMA of the t-th visited key tile into ring stage t % STAGES, completing the stage's
    barrier: page by page from the cache, or one box of the step's own K/V rows (key p at row
    own_row0 + p) for visited tiles t_own0 <= t < t_own1."""
    stage = t % STAGES
    ok = t < n_tiles
    bar = bars.index(stage)
    k_dst = k_smem.index(stage)
    v_dst = v_smem.index(stage)
    own_row = own_row0 + (n_tiles - 1 - t) * BLOCK_N
    if LOAD == OWN:  # the own-row run only loads tiles t < t_own1 <= n_tiles: no predicate
        mbarrier.expect(bar, 2 * k_desc.block_type.nbytes * (BLOCK_N // SUB))
        tma.async_copy_global_to_shared(kn_desc, [own_row, kv_col], bar, k_dst)
        tma.async_copy_global_to_shared(vn_desc, [own_row, kv_col], bar, v_dst)
        return
    mbarrier.expect(bar, 2 * k_desc.block_type.nbytes * (BLOCK_N // SUB), pred=ok)
    if LOAD == EITHER:
        if (t >= t_own0) & (t < t_own1):
            tma.async_copy_global_to_shared(kn_desc, [own_row, kv_col], bar, k_dst)
            tma.async_copy_global_to_shared(vn_desc, [own_row, kv_col], bar, v_dst)
        else:
            _load_paged(k_desc, v_desc, bar, k_dst, v_dst, rows, kv_col, ok, SUB, BLOCK_N)
    else:
        _load_paged(k_desc, v_desc, bar, k_dst, v_dst, rows, kv_col, ok, SUB, BLOCK_N)


@gluon.jit
def _steps(lo, hi, state, ring, geo, PAGE: gl.constexpr, SUB: gl.constexpr,
           BLOCK_N: gl.constexpr, STAGES: gl.constexpr, HEAD_DIM: gl.constexpr,
           MASK: gl.constexpr, LOAD: gl.constexpr, num_warps: gl.constexpr):
    """Visited tiles lo..hi-1 (`_step` each): state = (acc, p_op, m_i, l_i), ring = (q_op,
    k_smem, v_smem, bars, k_desc, v_desc, kn_desc, vn_desc), geo = the program's geometry."""
    acc, p_op, m_i, l_i = state
    for t in range(lo, hi):
        acc, p_op, m_i, l_i = _step(t, acc, p_op, m_i, l_i, ring, geo, PAGE, SUB, BLOCK_N,
                                    STAGES, HEAD_DIM, MASK, LOAD, num_warps)
    return acc, p_op, m_i, l_i


@gluon.jit
def _step(t, acc, p_op, m_i, l_i, ring, geo, PAGE: gl.constexpr, SUB: gl.constexpr,
          BLOCK_N: gl.constexpr, STAGES: gl.constexpr, HEAD_DIM: gl.constexpr,
          MASK: gl.constexpr, LOAD: gl.constexpr, num_warps: gl.constexpr):
    """Visited tile t >= 1: S_t = Q K_t^T and the PV of tile t - 1 are issued together and
    only S_t is waited for, so its softmax runs while the tensor cores do the PV. Then tile
    t - 1 + STAGES is loaded the LOAD way."""
    q_op, k_smem, v_smem, bars, k_desc, v_desc, kn_desc, vn_desc = ring
    bt_row, n_tiles, last_page, t_own0, t_own1, own_row0, kv_col, q_pos, k_off, s_zero, \
        qk_scale = geo
    o_l: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, HEAD_DIM, 16])
    p_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_l, k_width=2)
    stage = t % STAGES
    prev = (t - 1) % STAGES
    rows = (0, 0, 0, 0)
    if LOAD != OWN:
        rows = _kv_rows(bt_row, t - 1 + STAGES, n_tiles, last_page, t_own0, t_own1, PAGE, SUB,
                        BLOCK_N, LOAD)
    mbarrier.wait(bars.index(stage), (t // STAGES) & 1)
    s = warpgroup_mma(q_op, k_smem.index(stage).permute((1, 0)), s_zero, use_acc=False,
                      is_async=True)
    acc = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
    s = warpgroup_mma_wait(num_outstanding=1, deps=(s,))
    k_pos = (n_tiles - 1 - t) * BLOCK_N + k_off
    p, alpha, m_i, l_i = _softmax_tile(s, m_i, l_i, q_pos, k_pos, qk_scale, MASK)
    acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_op))
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_l)), 1)
    p_op = gl.convert_layout(p.to(k_smem.dtype), p_l)
    # Stage `prev` is free: its K was read by S_{t-1}, its V by the PV just waited on.
    gl.thread_barrier()
    _load_kv(k_desc, v_desc, kn_desc, vn_desc, bars, k_smem, v_smem, rows, t - 1 + STAGES,
             n_tiles, kv_col, t_own0, t_own1, own_row0, SUB, BLOCK_N, STAGES, LOAD)
    return acc, p_op, m_i, l_i


# NOTE: like the portable kernel's, the metadata pointers are slices (requests after the
# decodes), so their alignment is not specialized: no recompile mid-serving.
@gluon.jit(
    do_not_specialize=["stride_bt_req"],
    do_not_specialize_on_alignment=["bt_ptr", "qsl_ptr", "seq_lens_ptr"],
)
def _prefill_kernel(
    q_desc, k_desc, v_desc, kn_desc, vn_desc, out_ptr, bt_ptr, qsl_ptr, seq_lens_ptr,
    qk_scale, stride_o_tok, stride_o_head, stride_bt_req,
    GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, PAGE: gl.constexpr, SUB: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, NEW_KV: gl.constexpr,
    Q_REGS: gl.constexpr, num_warps: gl.constexpr,
):
    # Row tiles are the fastest grid dim, so the programs running at once share a few heads'
    # K/V in L2 (heads fastest, an SM-full of programs reads 100+ heads' K/V at 4K context
    # and becomes HBM-bound); last row tile first: long key ranges start first.
    m0 = (gl.num_programs(0) - 1 - gl.program_id(0)) * BLOCK_M
    head = gl.program_id(1)
    req = gl.program_id(2)
    q_start = gl.load(qsl_ptr + req)
    q_len = gl.load(qsl_ptr + req + 1) - q_start
    if m0 < q_len:
        seq_len = gl.load(seq_lens_ptr + req)
        prefix = seq_len - q_len
        pos0 = prefix + m0  # context position of the tile's first row
        n_tiles = gl.cdiv(gl.minimum(pos0 + BLOCK_M, seq_len), BLOCK_N)
        n_masked = n_tiles - (pos0 + 1) // BLOCK_N  # tiles crossing the diagonal: 0, 1 or 2
        last_page = (seq_len - 1) // PAGE
        # The step's own K/V rows (NEW_KV) are aligned with q: key p >= prefix sits at row
        # q_start - prefix + p. Whole key tiles of them, tiles cdiv(prefix, BLOCK_N) to
        # seq_len // BLOCK_N - 1, are visited as t_own0 <= t < t_own1 and skip the page
        # gather; a tile that straddles the prefix or runs past the request reads the cache.
        t_own0 = gl.maximum(n_tiles - seq_len // BLOCK_N, 0)
        t_own1 = n_tiles - gl.cdiv(prefix, BLOCK_N)
        if not NEW_KV:  # no own-row runs: every unmasked step is in the first, paged run
            t_own0 = n_tiles + STAGES
            t_own1 = t_own0
        own_row0 = q_start - prefix
        kv_col = (head // GROUP) * HEAD_DIM
        bt_row = bt_ptr + req.to(gl.int64) * stride_bt_req
        FIRST: gl.constexpr = EITHER if NEW_KV else PAGED

        s_l: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 16])
        o_l: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, HEAD_DIM, 16])
        p_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_l, k_width=2)
        dtype: gl.constexpr = q_desc.dtype

        q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)

        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [q_start + m0, head * HEAD_DIM], q_bar, q_smem)
        for i in gl.static_range(STAGES):
            rows = _kv_rows(bt_row, i, n_tiles, last_page, t_own0, t_own1, PAGE, SUB, BLOCK_N,
                            FIRST)
            _load_kv(k_desc, v_desc, kn_desc, vn_desc, bars, k_smem, v_smem, rows, i, n_tiles,
                     kv_col, t_own0, t_own1, own_row0, SUB, BLOCK_N, STAGES, FIRST)

        q_pos = pos0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_l))
        k_off = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_l))
        m_i = gl.full([BLOCK_M], -float("inf"), gl.float32, layout=gl.SliceLayout(1, s_l))
        l_i = gl.zeros([BLOCK_M], gl.float32, layout=gl.SliceLayout(1, s_l))
        acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_l)
        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_l)

        # First visited tile: S, its softmax, no PV in flight yet.
        mbarrier.wait(q_bar, 0)
        if Q_REGS:
            q_op = q_smem.load(gl.DotOperandLayout(operand_index=0, parent=s_l, k_width=2))
        else:
            q_op = q_smem
        mbarrier.wait(bars.index(0), 0)
        s = warpgroup_mma(q_op, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False,
                          is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
        k_pos = (n_tiles - 1) * BLOCK_N + k_off
        if n_masked > 0:
            p, alpha, m_i, l_i = _softmax_tile(s, m_i, l_i, q_pos, k_pos, qk_scale, True)
        else:
            p, alpha, m_i, l_i = _softmax_tile(s, m_i, l_i, q_pos, k_pos, qk_scale, False)
        p_op = gl.convert_layout(p.to(dtype), p_l)

        # The rest of the diagonal-crossing tiles (at most one more), then unmasked tiles.
        ring = (q_op, k_smem, v_smem, bars, k_desc, v_desc, kn_desc, vn_desc)
        geo = (bt_row, n_tiles, last_page, t_own0, t_own1, own_row0, kv_col, q_pos, k_off,
               s_zero, qk_scale)
        u0 = gl.maximum(n_masked, 1)
        acc, p_op, m_i, l_i = _steps(1, u0, (acc, p_op, m_i, l_i), ring, geo, PAGE, SUB,
                                     BLOCK_N, STAGES, HEAD_DIM, True, FIRST, num_warps)
        # Unmasked steps in up to three runs by how the tile they load (t - 1 + STAGES) is
        # read: pages, own rows, pages; tiles past n_tiles are not loaded at all.
        e1 = gl.minimum(gl.maximum(t_own0 - STAGES + 1, u0), n_tiles)
        e2 = gl.minimum(gl.maximum(t_own1 - STAGES + 1, e1), n_tiles)
        acc, p_op, m_i, l_i = _steps(u0, e1, (acc, p_op, m_i, l_i), ring, geo, PAGE, SUB,
                                     BLOCK_N, STAGES, HEAD_DIM, False, PAGED, num_warps)
        if NEW_KV:
            acc, p_op, m_i, l_i = _steps(e1, e2, (acc, p_op, m_i, l_i), ring, geo, PAGE, SUB,
                                         BLOCK_N, STAGES, HEAD_DIM, False, OWN, num_warps)
            acc, p_op, m_i, l_i = _steps(e2, n_tiles, (acc, p_op, m_i, l_i), ring, geo, PAGE,
                                         SUB, BLOCK_N, STAGES, HEAD_DIM, False, PAGED,
                                         num_warps)

        acc = warpgroup_mma(p_op, v_smem.index((n_tiles - 1) % STAGES), acc, is_async=True)
        acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_op))
        acc = acc / gl.expand_dims(gl.convert_layout(l_i, gl.SliceLayout(1, o_l)), 1)

        rows = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_l))
        cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_l))
        ptrs = (out_ptr + gl.expand_dims((q_start + rows).to(gl.int64) * stride_o_tok, 1)
                + head * stride_o_head + gl.expand_dims(cols, 0))
        gl.store(ptrs, acc.to(dtype), mask=gl.expand_dims(rows < q_len, 1))
        mbarrier.invalidate(q_bar)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))


@functools.lru_cache(maxsize=8)
def _is_sm90(index: int) -> bool:
    return torch.cuda.get_device_capability(index) == (9, 0)


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1])


def takes_hopper_cache(kv_cache: torch.Tensor, dtype: torch.dtype) -> bool:
    """The part of `takes_hopper_prefill` that depends on the cache and q's dtype only."""
    if not (kv_cache.is_cuda and os.environ.get("KESTREL_HOPPER_PREFILL") != "0"):
        return False
    index = kv_cache.device.index
    index = index if index is not None else torch.cuda.current_device()
    head_dim, page = kv_cache.shape[4], kv_cache.shape[2]
    return (
        _is_sm90(index) and dtype in _GL_DTYPES and kv_cache.dtype == dtype
        and head_dim in (64, 128) and page >= 16 and page & (page - 1) == 0
        and kv_cache.is_contiguous() and _aligned(kv_cache)
    )


def takes_hopper_prefill(q: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor) -> bool:
    """True where `prefill_attention` runs this kernel: an sm_90 GPU, 16-bit q/cache,
    head_dim 64 or 128, pages of 16+ tokens (power of two), heads packed in q's and out's rows
    and TMA-aligned strides. KESTREL_HOPPER_PREFILL=0 turns it off."""
    return (
        q.is_cuda and takes_hopper_cache(kv_cache, q.dtype) and q.shape[2] == kv_cache.shape[4]
        and q.stride(2) == 1 and q.stride(1) == q.shape[2] and _aligned(q)
        and out.stride(2) == 1
    )


def takes_new_kv(new_kv: tuple[torch.Tensor, torch.Tensor] | None, q: torch.Tensor,
                kv_cache: torch.Tensor) -> bool:
    """Whether the step's own K/V rows (`prefill_attention`'s `new_kv`) can be read by TMA:
    q's dtype and rows, heads packed in a row, aligned strides."""
    if new_kv is None:
        return False
    hkv, d = kv_cache.shape[3], q.shape[2]
    return all(
        t.dtype == q.dtype and t.shape == (q.shape[0], hkv, d) and t.stride(2) == 1
        and t.stride(1) == d and _aligned(t)
        for t in new_kv
    )


def _packed(t: torch.Tensor) -> torch.Tensor:
    """[rows, heads, d] with heads packed in a row -> the [rows, heads * d] view TMA reads."""
    return t.as_strided((t.shape[0], t.shape[1] * t.shape[2]), (t.stride(0), 1))


def _descriptors(q, kv_cache, new_kv, sub):
    d = q.shape[2]
    gdt = _GL_DTYPES[q.dtype]
    _, num_blocks, page, hkv, _ = kv_cache.shape
    # One layout for every K/V box: a page part or a whole tile lands in the same ring.
    layout = gl.NVMMASharedLayout.get_default_for([BLOCK_N, d], gdt)
    q2 = _packed(q)
    q_desc = TensorDescriptor(q2, list(q2.shape), list(q2.stride()), [BLOCK_M, d],
                              gl.NVMMASharedLayout.get_default_for([BLOCK_M, d], gdt))
    kv = []
    for i in (0, 1):
        c2 = kv_cache[i].view(num_blocks * page, hkv * d)  # one row per cache slot
        kv.append(TensorDescriptor(c2, list(c2.shape), list(c2.stride()), [sub, d], layout))
    new = kv  # unread stand-ins when there are no new rows (NEW_KV=False)
    if new_kv is not None:
        new = [TensorDescriptor(t2, list(t2.shape), list(t2.stride()), [BLOCK_N, d], layout)
               for t2 in map(_packed, new_kv)]
    return q_desc, kv[0], kv[1], new[0], new[1]


def hopper_prefill_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    max_query_len: int,
    scale: float,
    out: torch.Tensor,
    new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """`prefill_attention` on sm_90 (arguments as there; `takes_hopper_prefill` must hold).
    `new_kv` is read only where `takes_new_kv` holds; the cache serves every key otherwise."""
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    page, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    sub = min(page, BLOCK_N)
    if not takes_new_kv(new_kv, q, kv_cache):
        new_kv = None
    descs = _descriptors(q, kv_cache, new_kv, sub)
    grid = (triton.cdiv(max_query_len, BLOCK_M), num_q_heads, seq_lens.shape[0])
    _prefill_kernel[grid](
        *descs, out, block_table, query_start_loc, seq_lens,
        scale * math.log2(math.e), out.stride(0), out.stride(1), block_table.stride(0),
        GROUP=num_q_heads // num_kv_heads, HEAD_DIM=head_dim, PAGE=page, SUB=sub,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, STAGES=STAGES, NEW_KV=new_kv is not None,
        Q_REGS=new_kv is not None,
        num_warps=NUM_WARPS,
    )
    return out
