"""A measured alternative to cuBLAS, not used by the engine: decode-batch GEMM through TMA
descriptors, y[m, n] = sum_k x[m, k] * W[n, k] at 32-256 rows (bench_gemm_tma.py times it).

On one H100 it lost to cuBLAS (see benchmarks/kernels/NOTES.md), so `kestrel.layers.linear`
keeps cuBLAS for these batches; the kernel stays here so the measurement can be repeated.

Both operands arrive by tensor-memory-accelerator copies (out-of-bounds rows and columns read
as zero, so the loop has no masks), which Triton pipelines into the tensor cores on
Hopper. Two orientations: SWAP puts the weight rows on the MMA's M dimension and the tokens on N
(W x^T), the other is the plain x W^T. K is split over programs when the output tiles alone
cannot fill the GPU; the last program of a tile adds the fp32 partials in split order
(deterministic, no second launch), as `kestrel.kernels.gemm` does.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kestrel.kernels.gemm import SCRATCH, split_plan, store_split_tile
from kestrel.kernels.utils import (
    cdiv,
    check_x_weight,
    next_power_of_2,
    num_sms,
    pdl_options,
    pdl_wait,
)

_SMEM_BUDGET = 192 * 1024  # bytes of operand stages per program (H100: 227 KB per block)


class TmaGemmConfig(NamedTuple):
    swap: bool  # weight rows on the MMA's M dimension (W x^T)
    block_m: int  # tokens per program
    block_n: int  # weight rows per program
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int


@triton.jit(do_not_specialize=["M"])  # one binary for every batch size
def _gemm_tma_kernel(
    # descriptors and pointers
    x_desc,
    w_desc,
    y_ptr,
    part_ptr,
    count_ptr,
    # sizes
    M,
    N,
    K,
    K_PER_SPLIT,
    # strides
    stride_ym,
    # meta
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr,
    SWAP: tl.constexpr,
    F32_IEEE: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    off_n = pid_n * BLOCK_N
    off_m = pid_m * BLOCK_M
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(K, k_lo + K_PER_SPLIT)
    pdl_wait(USE_PDL)
    if SWAP:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        w = w_desc.load([off_n, k0])  # [BLOCK_N, BLOCK_K]
        x = x_desc.load([off_m, k0])  # [BLOCK_M, BLOCK_K]
        if SWAP:
            if F32_IEEE:  # tests: float32 without TF32 rounding
                acc = tl.dot(w, tl.trans(x), acc, input_precision="ieee")
            else:
                acc = tl.dot(w, tl.trans(x), acc)
        else:
            if F32_IEEE:
                acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w), acc)

    if SWAP:
        offs_n = off_n + tl.arange(0, BLOCK_N)[:, None]  # [BLOCK_N, 1]
        offs_m = off_m + tl.arange(0, BLOCK_M)[None, :]  # [1, BLOCK_M]
    else:
        offs_m = off_m + tl.arange(0, BLOCK_M)[:, None]  # [BLOCK_M, 1]
        offs_n = off_n + tl.arange(0, BLOCK_N)[None, :]  # [1, BLOCK_N]
    mask = (offs_n < N) & (offs_m < M)
    y_ptrs = y_ptr + offs_m.to(tl.int64) * stride_ym + offs_n
    p_offs = offs_m.to(tl.int64) * N + offs_n
    count = count_ptr + pid_m * tl.num_programs(0) + pid_n
    store_split_tile(acc, y_ptrs, mask, part_ptr, p_offs, M * N, count, pid_k,
                     tl.num_programs(2), SPLIT)


def _stages(block_m: int, block_n: int, block_k: int, elem: int) -> int:
    return max(2, min(4, _SMEM_BUDGET // ((block_m + block_n) * block_k * elem)))


def _warps(block_m: int, block_n: int) -> int:
    return 8 if block_m * block_n > 64 * 128 else 4


def _split_for(tiles: int, k: int, block_k: int, sms: int) -> int:
    # Split K until the tiles cover the SMs, keeping at least four K tiles per split.
    split = 1
    while tiles * split * 2 <= sms and k // (split * 2) >= 4 * block_k:
        split *= 2
    return split


def tma_config(m: int, n: int, k: int, device: torch.device, elem: int = 2) -> TmaGemmConfig:
    """Default tiles for an [m, k] x [n, k]^T product: weight rows on M, all tokens (up to 256)
    on N, so each weight tile is read once and x's K slice is reused by 128 weight rows."""
    block_m = max(16, min(256, next_power_of_2(m)))
    block_n, block_k = 128, 64
    tiles = cdiv(n, block_n) * cdiv(m, block_m)
    split = _split_for(tiles, k, block_k, num_sms(device))
    return TmaGemmConfig(True, block_m, block_n, block_k, split, _warps(block_m, block_n),
                         _stages(block_m, block_n, block_k, elem))


def candidate_configs(m: int, n: int, k: int, elem: int = 2) -> list[TmaGemmConfig]:
    """Tiles a benchmark sweeps at m rows: both orientations, 1-8 K splits."""
    pm = max(16, next_power_of_2(m))
    shapes = []  # (swap, block_m, block_n, block_k)
    for bm in sorted({min(256, pm), min(128, pm)}):
        for bn in (64, 128):
            for bk in (64, 128):
                shapes.append((True, bm, bn, bk))
    for bm in sorted({min(128, pm), min(64, pm)}):
        for bn in (128, 256):
            shapes.append((False, bm, bn, 64))
    out = []
    for swap, bm, bn, bk in shapes:
        if bm * bn > 256 * 128:
            continue
        for split in (1, 2, 4, 8):
            if split > 1 and k // split < 2 * bk:
                continue
            out.append(TmaGemmConfig(swap, bm, bn, bk, split, _warps(bm, bn),
                                     _stages(bm, bn, bk, elem)))
    return out


def gemm_tma(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: TmaGemmConfig | None = None,
) -> torch.Tensor:
    """x @ weight.T (+ bias) for a decode batch.

    Args:
        x: [m, k], last dim contiguous, row stride a multiple of 16 bytes (a TMA rule).
        weight: [n, k], likewise, same dtype as x.
        bias: optional [n].
        config: tile override (benchmarks, tests).

    Returns:
        [m, n] in x.dtype.
    """
    assert x.dim() == 2, f"x must be [m, k], got {tuple(x.shape)}"
    m, k = x.shape
    check_x_weight(x, weight, k)
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m > 0:
        cfg = config or tma_config(m, n, k, x.device, x.element_size())
        k_per_split, split_k = split_plan(k, cfg.split_k, cfg.block_k)
        grid = (cdiv(n, cfg.block_n), cdiv(m, cfg.block_m), split_k)
        parts, counts = SCRATCH.for_launch(y, split_k, grid[0] * grid[1])
        x_desc = TensorDescriptor.from_tensor(x, [cfg.block_m, cfg.block_k])
        w_desc = TensorDescriptor.from_tensor(weight, [cfg.block_n, cfg.block_k])
        pdl = pdl_options(x.device)
        _gemm_tma_kernel[grid](
            x_desc, w_desc, y, parts, counts, m, n, k, k_per_split, y.stride(0),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT=split_k > 1,
            SWAP=cfg.swap, F32_IEEE=x.dtype == torch.float32, USE_PDL=bool(pdl),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl,
        )
    if bias is not None:
        y += bias
    return y
