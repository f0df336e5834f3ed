"""One-row GEMVs fused with their neighbours in a decoder layer, for batch-1 decode.

Owns the prologue kernel and its wrappers: RMSNorm (with the residual add) before the qkv and
gate_up projections, and SiLU-and-mul before down. Each folds a small launch-bound kernel
(~2 us at batch 1) into the weight stream. Must not own weights; tiles and loads come from
gemv.py. (RoPE + the K/V store as the qkv GEMV's epilogue, on rotate-half row pairs, measured
slower at batch 1 on one H100: 5.60 vs 5.56 ms/token, so rope_store stays a kernel.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kestrel.kernels.gemv import (
    check_vector,
    gemv_tiles,
    load_k,
    load_w,
    program_rows,
)
from kestrel.kernels.utils import (
    cdiv,
    check_last_dim_contiguous,
    check_x_weight,
    pdl_options,
    pdl_wait,
)


@triton.jit
def _prologue_x(x_ptr, res_ptr, h_ptr, g_ptr, k, mask_k, K, ss, pid, RMSNORM: tl.constexpr,
                HAS_RESIDUAL: tl.constexpr, EVEN_K: tl.constexpr):
    """A K-slice of the GEMV's input built from its producer's output, in float32; ss
    accumulates the sum of squares RMSNorm needs."""
    x_ty = x_ptr.dtype.element_ty
    if RMSNORM:
        h = load_k(x_ptr, k, mask_k, EVEN_K)
        if HAS_RESIDUAL:
            # Rounded to the activation dtype as norm.py does; program 0 stores it.
            res = load_k(res_ptr, k, mask_k, EVEN_K).to(tl.float32)
            h = (h.to(tl.float32) + res).to(x_ty)
            tl.store(h_ptr + k, h, mask=mask_k & (pid == 0))
        hf = h.to(tl.float32)
        ss += hf * hf
        # RMSNorm is a per-row scale, applied after the reduction. Unlike norm.py, the
        # normalized vector is not rounded to x's dtype before the weight multiply.
        xk = hf * load_k(g_ptr, k, mask_k, EVEN_K).to(tl.float32)
    else:
        # activation.py's rounding: silu in float32 rounded, product rounded, so the
        # fused input is bit-identical to silu_and_mul's output.
        gate = load_k(x_ptr, k, mask_k, EVEN_K).to(tl.float32)
        up = load_k(x_ptr + K, k, mask_k, EVEN_K).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(x_ty)
        xk = (act.to(tl.float32) * up).to(x_ty).to(tl.float32)
    return xk, ss


@triton.jit
def _gemv_prologue_kernel(
    # pointers
    x_ptr,  # [K] (RMSNORM) or [2K] = [gate | up] (SiLU-and-mul)
    res_ptr,  # [K] residual, HAS_RESIDUAL only
    h_ptr,  # [K] out: x + residual, HAS_RESIDUAL only
    g_ptr,  # [K] norm weight, RMSNORM only
    w_ptr,
    b_ptr,  # [N] bias, HAS_BIAS only
    y_ptr,
    # sizes
    N,
    K,
    eps,
    # strides
    stride_wn,
    # meta
    RMSNORM: tl.constexpr,  # else SiLU-and-mul
    HAS_RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    # One row of x; every program rebuilds the (L2-resident) input vector itself, so the op
    # before the GEMV costs no launch and no extra HBM round trip.
    pid, offs_n, offs_k, mask_n, w_rows = program_rows(w_ptr, N, stride_wn, BLOCK_N, BLOCK_K)
    ss = tl.zeros([BLOCK_K], dtype=tl.float32)  # RMSNORM: per-lane sums of h^2
    # First weight tile before the wait, as in _gemv_kernel.
    w = load_w(w_rows, offs_k, mask_n, offs_k < K, EVEN_K)
    pdl_wait(USE_PDL)
    xk, ss = _prologue_x(x_ptr, res_ptr, h_ptr, g_ptr, offs_k, offs_k < K, K, ss, pid,
                         RMSNORM, HAS_RESIDUAL, EVEN_K)
    acc = w * xk[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        k = k0 + offs_k
        mask_k = k < K
        w = load_w(w_rows, k, mask_n, mask_k, EVEN_K)
        xk, ss = _prologue_x(x_ptr, res_ptr, h_ptr, g_ptr, k, mask_k, K, ss, pid,
                             RMSNORM, HAS_RESIDUAL, EVEN_K)
        acc += w * xk[None, :]
    y = tl.sum(acc, axis=1)
    if RMSNORM:
        y = y * tl.rsqrt(tl.sum(ss, axis=0) / K + eps)
    if HAS_BIAS:  # in float32, before the single rounding (gemv adds it after rounding)
        y += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=mask_n)


def _gemv_prologue(x, residual, h, norm_weight, weight, bias, eps, rmsnorm, tiles):
    n, k = weight.shape
    if bias is not None:
        check_vector("bias", bias, n)
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    block_n, block_k, warps = tiles or gemv_tiles(n, k)
    _gemv_prologue_kernel[(cdiv(n, block_n),)](
        x, residual, h, norm_weight, weight, bias, y, n, k, eps, weight.stride(0),
        RMSNORM=rmsnorm, HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0,
        num_warps=warps, num_stages=4, USE_PDL=bool(pdl := pdl_options(x.device)), **pdl,
    )
    return y


def gemv_rmsnorm(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    residual: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    tiles: tuple[int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """rms_norm(x (+ residual)) @ weight.T (+ bias) for one row, in one launch.

    Args:
        x: [1, k], last dim contiguous.
        norm_weight: contiguous [k].
        weight: [n, k], last dim contiguous, same dtype as x.
        residual: optional [1, k], same dtype as x.
        bias: optional contiguous [n].
        tiles: (BLOCK_N, BLOCK_K, num_warps) to override the heuristic (benchmarks).

    Returns:
        (y [1, n] in x.dtype, h) where h = x + residual rounded to x.dtype (a new tensor), or
        x itself without residual.
    """
    assert x.dim() == 2 and x.shape[0] == 1, f"x must be one row [1, k], got {tuple(x.shape)}"
    k = x.shape[1]
    check_x_weight(x, weight, k)
    check_vector("norm_weight", norm_weight, k)
    h = x
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype, (
            f"residual {tuple(residual.shape)} {residual.dtype} vs x {tuple(x.shape)} {x.dtype}"
        )
        check_last_dim_contiguous("residual", residual)
        h = torch.empty_like(x)
    y = _gemv_prologue(x, residual, h, norm_weight, weight, bias, eps, True, tiles)
    return y, h


def gemv_silu_mul(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    tiles: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """(silu(gate) * up) @ weight.T (+ bias) for one row x = [gate | up], in one launch.

    Args:
        x: [1, 2 * i], last dim contiguous.
        weight: [n, i], last dim contiguous, same dtype as x.
        bias: optional contiguous [n].
        tiles: (BLOCK_N, BLOCK_K, num_warps) to override the heuristic (benchmarks).

    Returns:
        [1, n] in x.dtype, rounded like silu_and_mul followed by gemv (up to the bias add).
    """
    assert x.dim() == 2 and x.shape[0] == 1 and x.shape[1] % 2 == 0, (
        f"x must be one row [1, 2 * i], got {tuple(x.shape)}"
    )
    check_x_weight(x, weight, x.shape[1] // 2)
    return _gemv_prologue(x, None, None, None, weight, bias, 0.0, False, tiles)
