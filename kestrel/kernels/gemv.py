"""Skinny GEMM for decode at tiny batch: y[m, n] = sum_k x[m, k] * W[n, k], m <= MAX_ROWS.

Owns the kernel, its tile choice and the jit helpers the fused variants (gemv_fused.py)
share. Must not own weights.
At batch 1 a linear layer only streams its weight once, and cuBLAS' GEMV leaves part of the
HBM bandwidth unused on the shapes of 7-8B models; this kernel keeps more bytes in flight per
SM (wide K tiles, pipelined loads) and accumulates in float32 registers, reducing over K once
at the end. The prologues fold the elementwise op into the x loads, so the separate ~2 us
launch-bound kernel before each GEMV disappears.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kestrel.kernels.utils import cdiv, check_x_weight, pdl_options, pdl_wait

# Rows of x handled per launch; larger batches go to cuBLAS (they are no longer GEMV-shaped).
MAX_ROWS = 4


@triton.jit
def load_k(ptr, k, mask_k, EVEN_K: tl.constexpr):
    """A K-slice of a vector, unmasked when K is a multiple of the tile."""
    if EVEN_K:
        return tl.load(ptr + k)
    else:
        return tl.load(ptr + k, mask=mask_k, other=0.0)


@triton.jit
def load_w(w_rows, k, mask_n, mask_k, EVEN_K: tl.constexpr):
    if EVEN_K:
        w = tl.load(w_rows + k[None, :], mask=mask_n[:, None], other=0.0)
    else:
        w = tl.load(w_rows + k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
    return w.to(tl.float32)


@triton.jit
def _dot_rows(acc, w, x_row_ptr, k, mask_k, EVEN_K: tl.constexpr):
    return acc + w * load_k(x_row_ptr, k, mask_k, EVEN_K).to(tl.float32)[None, :]


@triton.jit
def program_rows(w_ptr, N, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's output rows: (pid, row offsets, K offsets, row mask, [BLOCK_N, 1]
    pointers to the weight rows)."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    return pid, offs_n, tl.arange(0, BLOCK_K), offs_n < N, w_rows


@triton.jit
def _dot_all_rows(acc0, acc1, acc2, acc3, w, x_ptr, stride_xm, k, mask_k, M: tl.constexpr,
                  EVEN_K: tl.constexpr):
    acc0 = _dot_rows(acc0, w, x_ptr, k, mask_k, EVEN_K)
    if M > 1:
        acc1 = _dot_rows(acc1, w, x_ptr + stride_xm, k, mask_k, EVEN_K)
    if M > 2:
        acc2 = _dot_rows(acc2, w, x_ptr + 2 * stride_xm, k, mask_k, EVEN_K)
    if M > 3:
        acc3 = _dot_rows(acc3, w, x_ptr + 3 * stride_xm, k, mask_k, EVEN_K)
    return acc0, acc1, acc2, acc3


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
    USE_PDL: tl.constexpr,
):
    # Each weight tile is read once and applied to all M (<= 4) rows of x.
    pid, offs_n, offs_k, mask_n, w_rows = program_rows(w_ptr, N, stride_wn, BLOCK_N, BLOCK_K)
    acc0 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    # The first weight tile is requested before waiting on the previous kernel (weights are
    # never written): under PDL its latency hides behind that kernel's tail.
    w = load_w(w_rows, offs_k, mask_n, offs_k < K, EVEN_K)
    pdl_wait(USE_PDL)
    acc0, acc1, acc2, acc3 = _dot_all_rows(
        acc0, acc1, acc2, acc3, w, x_ptr, stride_xm, offs_k, offs_k < K, M, EVEN_K
    )
    for k0 in range(BLOCK_K, K, BLOCK_K):
        k = k0 + offs_k
        mask_k = k < K
        w = load_w(w_rows, k, mask_n, mask_k, EVEN_K)
        acc0, acc1, acc2, acc3 = _dot_all_rows(
            acc0, acc1, acc2, acc3, w, x_ptr, stride_xm, k, mask_k, M, EVEN_K
        )
    out_ty = y_ptr.dtype.element_ty
    tl.store(y_ptr + offs_n, tl.sum(acc0, axis=1).to(out_ty), mask=mask_n)
    if M > 1:
        tl.store(y_ptr + stride_ym + offs_n, tl.sum(acc1, axis=1).to(out_ty), mask=mask_n)
    if M > 2:
        tl.store(y_ptr + 2 * stride_ym + offs_n, tl.sum(acc2, axis=1).to(out_ty), mask=mask_n)
    if M > 3:
        tl.store(y_ptr + 3 * stride_ym + offs_n, tl.sum(acc3, axis=1).to(out_ty), mask=mask_n)


def gemv_tiles(n: int, k: int, m: int = 1) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps), from a sweep on one H100 at 7-8B and 0.6B shapes:
    the widest K tile with two output rows per program wins except for very tall matrices
    (the LM head), where four rows and eight warps do."""
    block_k = min(1024, triton.next_power_of_2(k))
    block_n = 4 if n >= 65536 else 2
    warps = 8 if n >= 65536 or k >= 8192 else 4
    if m > 2:  # four float32 accumulators: halve the tile to keep them in registers
        block_k = max(block_k // 2, 16)
    return block_n, block_k, warps


def check_vector(name: str, t: torch.Tensor, size: int) -> None:
    assert t.shape == (size,) and t.stride(0) == 1, (
        f"{name} must be contiguous [{size}], got {tuple(t.shape)} strides {t.stride()}"
    )


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
    assert x.dim() == 2, f"x must be [m, k], got {tuple(x.shape)}"
    assert x.shape[0] <= MAX_ROWS, f"x has {x.shape[0]} rows, at most {MAX_ROWS}"
    check_x_weight(x, weight, x.shape[1])
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m > 0:
        block_n, block_k, warps = tiles or gemv_tiles(n, k, m)
        _gemv_kernel[(cdiv(n, block_n),)](
            x, weight, y, n, k, x.stride(0), weight.stride(0), y.stride(0),
            M=m, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0,
            num_warps=warps, num_stages=4, USE_PDL=bool(pdl := pdl_options(x.device)), **pdl,
        )
    if bias is not None:
        y += bias
    return y
