"""Fused RMSNorm, optionally preceded by the residual add.

Owns the row-wise normalization kernel. Must not own weights or decide where residuals live;
its rounding follows HF Llama (float32 statistics, cast to the input dtype, then scale).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kestrel.kernels.utils import (
    check_dtype,
    check_last_dim_contiguous,
    next_power_of_2,
    pdl_options,
    pdl_wait,
)


@triton.jit
def rms_inv(xf, n, eps):
    """Reciprocal RMS of one float32 row (zero past its n valid entries). rope_store's per-head
    norms reduce each head the same way (one row per warp group) and must stay bit-equal."""
    var = tl.sum(xf * xf, axis=0) / n
    return tl.rsqrt(var + eps)


@triton.jit
def rms_scale(xf, inv, w, dtype: tl.constexpr):
    """Normalized row times the weight, in float32, with HF's rounding of the normalized value
    to `dtype` before the scale. Jit helper; the caller rounds the result."""
    return (xf * inv).to(dtype).to(tl.float32) * w.to(tl.float32)


def row_num_warps(block: int) -> int:
    """Warps for one program per row of `block` entries (the reduction layout follows them)."""
    return min(max(block // 512, 1), 16)


@triton.jit
def _rms_norm_kernel(
    # pointers
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    residual_out_ptr,
    # sizes
    hidden_size,
    eps,
    # strides
    stride_x,
    stride_res,
    stride_out,
    stride_res_out,
    # meta
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_wait(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden_size

    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)  # [BLOCK]
    if HAS_RESIDUAL:
        res = tl.load(residual_ptr + row * stride_res + offs, mask=mask, other=0.0)
        # Round the sum to the activation dtype, as an unfused `x + residual` would.
        x = (x.to(tl.float32) + res.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_res_out + offs, x, mask=mask)
    xf = x.to(tl.float32)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0)
    out = rms_scale(xf, rms_inv(xf, hidden_size, eps), w, x_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_out + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim, with an optional fused residual add.

    Args:
        x: [num_tokens, hidden_size], last dim contiguous.
        weight: [hidden_size].
        residual: optional [num_tokens, hidden_size], same dtype as x.

    Returns:
        Without residual: out [num_tokens, hidden_size] in x.dtype.
        With residual: (out, new_residual) where new_residual = x + residual (in x.dtype) and
        out = rms_norm(new_residual).
    """
    assert x.dim() == 2, f"x must be [num_tokens, hidden_size], got {tuple(x.shape)}"
    num_tokens, hidden_size = x.shape
    assert weight.shape == (hidden_size,), f"weight {tuple(weight.shape)} vs x {tuple(x.shape)}"
    check_dtype("x", x)
    check_last_dim_contiguous("x", x)
    assert weight.is_contiguous()
    out = torch.empty_like(x)
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype
        check_last_dim_contiguous("residual", residual)
        residual_out = torch.empty_like(x)
    else:
        residual, residual_out = x, out  # unused by the kernel
    if num_tokens > 0:
        block = next_power_of_2(hidden_size)
        _rms_norm_kernel[(num_tokens,)](
            x,
            residual,
            weight,
            out,
            residual_out,
            hidden_size,
            eps,
            x.stride(0),
            residual.stride(0),
            out.stride(0),
            residual_out.stride(0),
            HAS_RESIDUAL=residual is not x,
            BLOCK=block,
            num_warps=row_num_warps(block),
            USE_PDL=bool(pdl := pdl_options(x.device)),
            **pdl,
        )
    return out if residual is x else (out, residual_out)
