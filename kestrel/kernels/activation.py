"""Fused gated activation: silu(gate) * up over a merged [gate | up] projection.

Owns the elementwise kernel only. Must not own weights. Rounding follows the unfused PyTorch
expression in the input dtype: silu is rounded before the multiply.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kestrel.kernels.utils import (
    cdiv,
    check_dtype,
    check_last_dim_contiguous,
    pdl_options,
    pdl_wait,
)


@triton.jit
def _silu_and_mul_kernel(
    # pointers
    x_ptr,
    out_ptr,
    # sizes
    intermediate_size,
    # strides
    stride_x,
    stride_out,
    # meta
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_wait(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < intermediate_size
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + intermediate_size + offs, mask=mask, other=0.0)
    act = (gate / (1.0 + tl.exp(-gate))).to(x_ptr.dtype.element_ty)
    out = act.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[:, :I]) * x[:, I:].

    Args:
        x: [num_tokens, 2 * intermediate_size], last dim contiguous.

    Returns:
        [num_tokens, intermediate_size] in x.dtype.
    """
    assert x.dim() == 2 and x.shape[1] % 2 == 0, f"x {tuple(x.shape)}"
    check_dtype("x", x)
    check_last_dim_contiguous("x", x)
    num_tokens, intermediate_size = x.shape[0], x.shape[1] // 2
    out = torch.empty(num_tokens, intermediate_size, dtype=x.dtype, device=x.device)
    if num_tokens > 0:
        block = 1024
        grid = (num_tokens, cdiv(intermediate_size, block))
        _silu_and_mul_kernel[grid](
            x, out, intermediate_size, x.stride(0), out.stride(0), BLOCK=block, num_warps=4,
            USE_PDL=bool(pdl := pdl_options(x.device)), **pdl,
        )
    return out
