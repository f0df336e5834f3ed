"""Skinny GEMM for decode batches: y[m, n] = sum_k x[m, k] * W[n, k] with few rows m.

Owns the kernel, its tile choice and its split-K scratch. Must not own weights.
A decode step of a small model runs ~110 GEMMs of a few microseconds each, where cuBLAS is
latency-bound and cannot start until the previous kernel has finished. This kernel computes
the transposed product (W x^T, so the weight rows fill the tensor-core M dimension and the
few tokens the N dimension), and is launched with programmatic dependent launch like the other
decode-path kernels, so its programs are scheduled while the previous kernel drains. When the
output has too few tiles to occupy the GPU, K is split over programs; the last program of a
tile to finish adds the partial sums in split order (deterministic, no second launch).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kestrel.kernels.utils import cdiv, check_x_weight, num_sms, pdl_options, pdl_wait

# Rows of x the kernel accepts. Measured on one H100, cuBLAS is as fast or faster from ~32
# rows on (benchmarks/kernels/bench_gemm.py), so callers send it fewer.
MAX_ROWS = 256


class GemmConfig(NamedTuple):
    block_m: int  # tokens per program (the MMA's N dimension)
    block_n: int  # weight rows per program (the MMA's M dimension)
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int


@triton.jit
def _gemm_kernel(
    # pointers
    x_ptr,
    w_ptr,
    y_ptr,
    part_ptr,
    count_ptr,
    # sizes
    M,
    N,
    K,
    K_PER_SPLIT,
    # strides
    stride_xm,
    stride_wn,
    stride_ym,
    # meta
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    F32_IEEE: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_m = offs_m < M
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(K, k_lo + K_PER_SPLIT)
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + (k_lo + offs_k)[None, :]
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + (k_lo + offs_k)[None, :]
    pdl_wait(USE_PDL)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs, mask=mask_n[:, None], other=0.0)
            x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
        else:
            mask_k = (k0 + offs_k) < k_hi
            w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if F32_IEEE:  # tests: float32 without TF32 rounding
            acc = tl.dot(w, tl.trans(x), acc, input_precision="ieee")
        else:
            acc = tl.dot(w, tl.trans(x), acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K

    y_ptrs = y_ptr + offs_m.to(tl.int64)[None, :] * stride_ym + offs_n[:, None]
    p_offs = offs_m.to(tl.int64)[None, :] * N + offs_n[:, None]
    y_mask = mask_n[:, None] & mask_m[None, :]
    count = count_ptr + pid_m * tl.num_programs(0) + pid_n
    store_split_tile(acc, y_ptrs, y_mask, part_ptr, p_offs, M * N, count, pid_k, SPLIT_K,
                     SPLIT_K > 1)


@triton.jit
def store_split_tile(acc, y_ptrs, mask, part_ptr, p_offs, tile_elems, count_ptr, pid_k, splits,
                     SPLIT: tl.constexpr):
    """Store one output tile. With K split over `splits` programs, park this split's fp32
    partial at part[pid_k, m, n] (p_offs = m * N + n) and let the last split of the tile to
    arrive add all partials in split order (deterministic), then reset its counter."""
    if not SPLIT:
        tl.store(y_ptrs, acc.to(y_ptrs.dtype.element_ty), mask=mask)
    else:
        tl.store(part_ptr + pid_k * tile_elems + p_offs, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial precedes the release below
        if tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu") == splits - 1:
            total = tl.zeros(acc.shape, dtype=tl.float32)
            for s in range(0, splits):
                # .cg: other SMs wrote these; read from L2, never a stale L1 line.
                total += tl.load(part_ptr + s * tile_elems + p_offs, mask=mask, other=0.0,
                                 cache_modifier=".cg")
            tl.store(y_ptrs, total.to(y_ptrs.dtype.element_ty), mask=mask)
            tl.atomic_xchg(count_ptr, 0)  # ready for the next launch (e.g. a graph replay)


def gemm_config(m: int, n: int, k: int, device: torch.device) -> GemmConfig:
    """Tile choice for an [m, k] x [n, k]^T product (m <= MAX_ROWS)."""
    block_m = max(16, min(128, triton.next_power_of_2(m)))
    block_n = 64
    block_k = 128 if k % 128 == 0 else 64
    tiles = cdiv(n, block_n) * cdiv(m, block_m)
    sms = num_sms(device)
    split_k = 1
    # Split K until the tiles cover the SMs, keeping at least four K tiles per split.
    while tiles * split_k * 2 <= sms and k // (split_k * 2) >= 4 * block_k:
        split_k *= 2
    return GemmConfig(block_m, block_n, block_k, split_k, num_warps=4, num_stages=4)


class GemmScratch:
    """Split-K partial sums and per-tile arrival counters, shared by every launch on a device
    (each launch leaves the counters at zero, so CUDA-graph replays can share them too).

    It only grows, and a replaced buffer is kept alive: a captured graph still points at it.
    It must not grow during a capture (a zero-fill recorded there would not run until the first
    replay); the runner's eager warm-up at each graph size allocates it first.
    """

    def __init__(self) -> None:
        self._bufs: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._retired: list[torch.Tensor] = []

    def get(self, device: torch.device, part_elems: int, counters: int):
        parts, counts = self._bufs.get(device, (None, None))
        if parts is None or parts.numel() < part_elems or counts.numel() < counters:
            assert device.type != "cuda" or not torch.cuda.is_current_stream_capturing(), (
                "GEMM split-K scratch must grow outside CUDA-graph capture (run the graph's "
                "shape eagerly first)"
            )
            self._retired += [t for t in (parts, counts) if t is not None]
            part_elems = max(part_elems, parts.numel() if parts is not None else 0)
            counters = max(counters, counts.numel() if counts is not None else 0)
            parts = torch.empty(part_elems, dtype=torch.float32, device=device)
            counts = torch.zeros(counters, dtype=torch.int32, device=device)
            self._bufs[device] = (parts, counts)
        return parts, counts


    def for_launch(self, y: torch.Tensor, splits: int, tiles: int):
        """(partials, counters) for a launch writing y [m, n] in `splits` K splits over
        `tiles` output tiles; y itself (never touched) when K is not split."""
        if splits == 1:
            return y, y
        return self.get(y.device, splits * y.numel(), tiles)


SCRATCH = GemmScratch()


def split_plan(k: int, split_k: int, block_k: int) -> tuple[int, int]:
    """(K per split, rounded up to whole K tiles; the number of splits that leaves)."""
    k_per_split = cdiv(cdiv(k, split_k), block_k) * block_k
    return k_per_split, cdiv(k, k_per_split)


def gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """x @ weight.T (+ bias) for a decode batch.

    Args:
        x: [m, k] with m <= MAX_ROWS, last dim contiguous.
        weight: [n, k], last dim contiguous, same dtype as x.
        bias: optional [n].
        config: tile override (benchmarks, tests).

    Returns:
        [m, n] in x.dtype.
    """
    assert x.dim() == 2, f"x must be [m, k], got {tuple(x.shape)}"
    m, k = x.shape
    assert m <= MAX_ROWS, f"x has {m} rows, at most {MAX_ROWS}"
    check_x_weight(x, weight, k)
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m > 0:
        cfg = config or gemm_config(m, n, k, x.device)
        k_per_split, split_k = split_plan(k, cfg.split_k, cfg.block_k)
        grid = (cdiv(n, cfg.block_n), cdiv(m, cfg.block_m), split_k)
        parts, counts = SCRATCH.for_launch(y, split_k, grid[0] * grid[1])
        pdl = pdl_options(x.device)
        _gemm_kernel[grid](
            x, weight, y, parts, counts, m, n, k, k_per_split,
            x.stride(0), weight.stride(0), y.stride(0),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=split_k,
            EVEN_K=k % cfg.block_k == 0,
            F32_IEEE=x.dtype == torch.float32,
            USE_PDL=bool(pdl), num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl,
        )
    if bias is not None:
        y += bias
    return y
