"""Merge partial attention states (out_i, lse_i) computed over disjoint key sets.

Owns the LSE-weighted combine used by split-KV decode and, later, shared-prefix attention:

    lse = log(sum_i exp(lse_i))        out = sum_i exp(lse_i - lse) * out_i

A part whose lse is -inf attended to no keys; its out is never read, so producers may leave it
unwritten. Must not compute attention itself.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kestrel.kernels.utils import (
    check_last_dim_contiguous,
    next_power_of_2,
    pdl_options,
    pdl_wait,
)


@triton.jit
def _merge_states_kernel(
    # pointers
    parts_out_ptr,
    parts_lse_ptr,
    out_ptr,
    out_lse_ptr,
    # sizes
    num_parts,
    # strides
    stride_po_tok,
    stride_po_head,
    stride_po_part,
    stride_pl_tok,
    stride_pl_head,
    stride_pl_part,
    stride_o_tok,
    stride_o_head,
    stride_ol_tok,
    stride_ol_head,
    # meta
    HEAD_DIM: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    STORE_LSE: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_wait(USE_PDL)
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)

    in_range = offs_p < num_parts
    lse = tl.load(
        parts_lse_ptr + tok * stride_pl_tok + head * stride_pl_head + offs_p * stride_pl_part,
        mask=in_range,
        other=float("-inf"),
    )  # [BLOCK_P]
    # NOTE: issued together with the lse load, not masked by it: on the batch-1 decode path
    # every dependent load is a memory round trip of latency. An empty part may hold garbage
    # (even NaN), so it is dropped with a select below, not multiplied by a zero weight.
    part = tl.load(
        parts_out_ptr
        + tok * stride_po_tok
        + head * stride_po_head
        + offs_p[:, None] * stride_po_part
        + offs_d[None, :],
        mask=in_range[:, None] & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    ).to(tl.float32)  # [BLOCK_P, BLOCK_D]
    valid = lse > float("-inf")
    lse_max = tl.max(lse, axis=0)
    # All parts empty (e.g. a padded request with no context): out = 0, lse = -inf.
    shift = tl.where(lse_max > float("-inf"), lse_max, 0.0)
    w = tl.where(valid, tl.exp(lse - shift), 0.0)  # [BLOCK_P]
    w_sum = tl.sum(w, axis=0)
    part = tl.where(valid[:, None], part, 0.0)
    out = tl.sum(part * w[:, None], axis=0) / tl.maximum(w_sum, 1e-30)  # [BLOCK_D]
    tl.store(
        out_ptr + tok * stride_o_tok + head * stride_o_head + offs_d,
        out.to(out_ptr.dtype.element_ty),
        mask=offs_d < HEAD_DIM,
    )
    if STORE_LSE:
        tl.store(out_lse_ptr + tok * stride_ol_tok + head * stride_ol_head, shift + tl.log(w_sum))


def merge_states(
    parts_out: torch.Tensor,
    parts_lse: torch.Tensor,
    out: torch.Tensor | None = None,
    out_lse: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Combine partial attention outputs by their log-sum-exp weights.

    Args:
        parts_out: [num_tokens, num_heads, num_parts, head_dim], any strides with head_dim
            contiguous (e.g. `torch.stack([out_a, out_b], dim=2)`).
        parts_lse: [num_tokens, num_heads, num_parts] float32, natural log; -inf marks an empty
            part.
        out: optional preallocated [num_tokens, num_heads, head_dim] (head_dim contiguous).
        out_lse: optional [num_tokens, num_heads] float32 to receive the merged lse.
        out_dtype: dtype of a freshly allocated `out` (default parts_out.dtype).

    Returns:
        (out, out_lse); out_lse is None unless given.
    """
    num_tokens, num_heads, num_parts, head_dim = parts_out.shape
    assert parts_lse.shape == (num_tokens, num_heads, num_parts), (
        f"parts_lse {tuple(parts_lse.shape)} vs parts_out {tuple(parts_out.shape)}"
    )
    assert parts_lse.dtype == torch.float32
    check_last_dim_contiguous("parts_out", parts_out)
    if out is None:
        out = torch.empty(
            num_tokens,
            num_heads,
            head_dim,
            dtype=out_dtype or parts_out.dtype,
            device=parts_out.device,
        )
    assert out.shape == (num_tokens, num_heads, head_dim), f"out {tuple(out.shape)}"
    check_last_dim_contiguous("out", out)
    if out_lse is not None:
        assert out_lse.shape == (num_tokens, num_heads) and out_lse.dtype == torch.float32
    if num_tokens == 0:
        return out, out_lse
    lse_arg = out_lse if out_lse is not None else parts_lse
    _merge_states_kernel[(num_tokens, num_heads)](
        parts_out,
        parts_lse,
        out,
        lse_arg,
        num_parts,
        parts_out.stride(0),
        parts_out.stride(1),
        parts_out.stride(2),
        parts_lse.stride(0),
        parts_lse.stride(1),
        parts_lse.stride(2),
        out.stride(0),
        out.stride(1),
        lse_arg.stride(0),
        lse_arg.stride(1),
        HEAD_DIM=head_dim,
        BLOCK_P=next_power_of_2(num_parts),
        BLOCK_D=next_power_of_2(head_dim),
        STORE_LSE=out_lse is not None,
        num_warps=4 if head_dim * num_parts <= 8192 else 8,
        USE_PDL=bool(pdl := pdl_options(parts_out.device)),
        **pdl,
    )
    return out, out_lse
