"""Skinny GEMM for decode at tiny batch: y[m, n] = sum_k x[m, k] * W[n, k], m <= MAX_ROWS.

Owns the kernel and its tile choice. Must not own weights. At batch 1 a linear layer only
streams its weight once, and cuBLAS' GEMV leaves part of the HBM bandwidth unused on the
shapes of 7-8B models; this kernel keeps more bytes in flight per SM (wide K tiles, pipelined
loads) and accumulates in float32 registers, reducing over K once at the end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kestrel.kernels.utils import cdiv, check_dtype, check_last_dim_contiguous

# Rows of x handled per launch; larger batches go to cuBLAS (they are no longer GEMV-shaped).
MAX_ROWS = 4


@triton.jit
def _dot_rows(acc, w, x_row_ptr, k, mask_k, EVEN_K: tl.constexpr):
    if EVEN_K:
        x = tl.load(x_row_ptr + k)
    else:
        x = tl.load(x_row_ptr + k, mask=mask_k, other=0.0)
    return acc + w * x.to(tl.float32)[None, :]


@triton.jit
def _gemv_kernel(
    # pointers
    x_ptr,
    w_ptr,
    y_ptr,
    # sizes
    N,
    K,
    # strides
    stride_xm,
    stride_wn,
    stride_ym,
    # meta
    M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    # Each weight tile is read once and applied to all M (<= 4) rows of x.
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn  # [BLOCK_N, 1]
    acc0 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        mask_k = k < K
        if EVEN_K:
            w = tl.load(w_rows + k[None, :], mask=mask_n[:, None], other=0.0)
        else:
            w = tl.load(w_rows + k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        w = w.to(tl.float32)
        acc0 = _dot_rows(acc0, w, x_ptr, k, mask_k, EVEN_K)
        if M > 1:
            acc1 = _dot_rows(acc1, w, x_ptr + stride_xm, k, mask_k, EVEN_K)
        if M > 2:
            acc2 = _dot_rows(acc2, w, x_ptr + 2 * stride_xm, k, mask_k, EVEN_K)
        if M > 3:
            acc3 = _dot_rows(acc3, w, x_ptr + 3 * stride_xm, k, mask_k, EVEN_K)
    out_ty = y_ptr.dtype.element_ty
    tl.store(y_ptr + offs_n, tl.sum(acc0, axis=1).to(out_ty), mask=mask_n)
    if M > 1:
        tl.store(y_ptr + stride_ym + offs_n, tl.sum(acc1, axis=1).to(out_ty), mask=mask_n)
    if M > 2:
        tl.store(y_ptr + 2 * stride_ym + offs_n, tl.sum(acc2, axis=1).to(out_ty), mask=mask_n)
    if M > 3:
        tl.store(y_ptr + 3 * stride_ym + offs_n, tl.sum(acc3, axis=1).to(out_ty), mask=mask_n)


def _tiles(n: int, k: int, m: int = 1) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps), from a sweep on one H100 at 7-8B and 0.6B shapes:
    the widest K tile with two output rows per program wins except for very tall matrices
    (the LM head), where four rows and eight warps do."""
    block_k = min(1024, triton.next_power_of_2(k))
    block_n = 4 if n >= 65536 else 2
    warps = 8 if n >= 65536 or k >= 8192 else 4
    if m > 2:  # four float32 accumulators: halve the tile to keep them in registers
        block_k = max(block_k // 2, 16)
    return block_n, block_k, warps


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    tiles: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """x @ weight.T (+ bias) for a few rows of x.

    Args:
        x: [m, k] with m <= MAX_ROWS, last dim contiguous.
        weight: [n, k], last dim contiguous, same dtype as x.
        bias: optional [n].
        tiles: (BLOCK_N, BLOCK_K, num_warps) to override the heuristic (benchmarks).

    Returns:
        [m, n] in x.dtype.
    """
    assert x.dim() == 2 and weight.dim() == 2 and x.shape[1] == weight.shape[1], (
        f"x {tuple(x.shape)} weight {tuple(weight.shape)}"
    )
    assert x.shape[0] <= MAX_ROWS, f"x has {x.shape[0]} rows, at most {MAX_ROWS}"
    assert x.dtype == weight.dtype, f"x {x.dtype} vs weight {weight.dtype}"
    check_dtype("x", x)
    check_last_dim_contiguous("x", x)
    check_last_dim_contiguous("weight", weight)
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m > 0:
        block_n, block_k, warps = tiles or _tiles(n, k, m)
        _gemv_kernel[(cdiv(n, block_n),)](
            x, weight, y, n, k, x.stride(0), weight.stride(0), y.stride(0),
            M=m, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0,
            num_warps=warps, num_stages=4,
        )
    if bias is not None:
        y += bias
    return y
