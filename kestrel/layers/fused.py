"""Fusions across module boundaries for one-row steps (batch-1 decode) on the GPU.

Owns the choice between a fused GEMV, which folds the RMSNorm (+ residual add) or the gated
activation into the read of the next weight, and the modules run one after the other. At batch
1 each of those small kernels costs a launch (~2 us) for a few KB of data, three per layer.
Must not own weights or math: every branch calls the modules' own kernels or forward.
"""

from __future__ import annotations

import torch

from kestrel.layers.activation import SiluAndMul
from kestrel.layers.linear import LinearBase, takes_gemv
from kestrel.layers.norm import RMSNorm


def rms_norm_linear(
    norm: RMSNorm, linear: LinearBase, x: torch.Tensor, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear(norm(x + residual)), x + residual); without residual, (linear(norm(x)), x)."""
    if takes_gemv(x):
        from kestrel.kernels.gemv_fused import gemv_rmsnorm

        return gemv_rmsnorm(x, norm.weight, norm.eps, linear.weight, residual, linear.bias)
    if residual is None:
        return linear(norm(x)), x
    normed, residual = norm(x, residual)
    return linear(normed), residual


def act_linear(act: torch.nn.Module, linear: LinearBase, x: torch.Tensor) -> torch.Tensor:
    """linear(act(x)) for a gated activation over x = [gate | up]."""
    if isinstance(act, SiluAndMul) and takes_gemv(x):
        from kestrel.kernels.gemv_fused import gemv_silu_mul

        return gemv_silu_mul(x, linear.weight, linear.bias)
    return linear(act(x))
