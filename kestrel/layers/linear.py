"""Linear layers whose parameters know how to load themselves from checkpoint tensors.

Owns weight/bias allocation and each parameter's `weight_loader`, including the packing of
several checkpoint tensors (q/k/v, gate/up) into one merged matrix so one GEMM replaces
several. Must not read files or know checkpoint names; the loader maps names to parameters.

Every parameter carries `param.weight_loader(param, loaded_weight, shard_id=None)`.
Packed layers also expose `shard_ids` (the shard names a full load must visit).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def default_weight_loader(
    param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None
) -> None:
    """Copy a whole tensor into `param` (dtype cast included); shapes must match exactly."""
    if shard_id is not None:
        raise ValueError(f"parameter of shape {tuple(param.shape)} is not packed")
    if param.shape != loaded.shape:
        raise ValueError(
            f"shape mismatch: checkpoint {tuple(loaded.shape)} vs model {tuple(param.shape)}"
        )
    param.data.copy_(loaded)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T (+ b). On CUDA in 16-bit: one row (batch-1 decode) takes the Triton GEMV, which
    streams the weight 5-13% faster than cuBLAS at 0.6B-8B shapes on one H100
    (benchmarks/kernels/bench_decode_small.py); 2-32 rows against a small weight take the
    skinny Triton GEMM (see `takes_gemm`); the rest cuBLAS."""
    if takes_gemv(x):
        from kestrel.kernels.gemv import gemv

        return gemv(x, weight, bias)
    if takes_gemm(x, weight):
        from kestrel.kernels.gemm import gemm

        return gemm(x, weight, bias)
    return F.linear(x, weight, bias)


# Rows and weight size up to which the Triton GEMM replaces cuBLAS. One H100, every layer's
# four projections in one CUDA graph (benchmarks/kernels/bench_gemm.py): Qwen3-0.6B at 2-16
# rows 1.16-1.18x faster (its launches overlap under PDL; these GEMMs are latency-bound), at 32
# rows 1.08x, at 64 0.93x; Llama-3-8B (33-235 MB weights, bandwidth-bound) 0.94x at 2-32 rows.
# End to end, 32 rows gained 2.4% at 24 requests and were even at 32. The row limit is a
# CUDA-graph bucket, so a decode step and its graph replay pick the same kernel.
GEMM_MAX_ROWS = 32
GEMM_MAX_WEIGHT_BYTES = 16 << 20


def takes_gemm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True for the inputs `linear` sends to the Triton skinny GEMM. Only where it launches
    with programmatic dependent launch (Hopper and later, KESTREL_PDL not 0): without it the
    kernel alone is no faster than cuBLAS."""
    if not (x.is_cuda and x.dim() == 2 and 2 <= x.shape[0] <= GEMM_MAX_ROWS
            and x.dtype in _GEMV_DTYPES
            and weight.numel() * weight.element_size() <= GEMM_MAX_WEIGHT_BYTES):
        return False
    from kestrel.kernels.utils import pdl_options

    return bool(pdl_options(x.device))


def takes_gemv(x: torch.Tensor) -> bool:
    """True for the inputs `linear` sends to the Triton GEMV: one 16-bit row on CUDA."""
    return x.is_cuda and x.dim() == 2 and x.shape[0] == 1 and x.dtype in _GEMV_DTYPES


_GEMV_DTYPES = (torch.bfloat16, torch.float16)


class LinearBase(nn.Module):
    """y = x W^T (+ b). Output rows may be split into named shards (`_shard_slices`)."""

    def __init__(self, input_size: int, output_size: int, bias: bool) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        if bias:
            self.bias: nn.Parameter | None = nn.Parameter(
                torch.empty(output_size), requires_grad=False
            )
            self.bias.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        else:
            self.register_parameter("bias", None)
        # shard id -> (row offset, rows); empty for unpacked layers
        self._shard_slices: dict[str | int, tuple[int, int]] = {}

    @property
    def shard_ids(self) -> list[str | int]:
        return list(self._shard_slices)

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None
    ) -> None:
        if shard_id is None:
            default_weight_loader(param, loaded)
            return
        if shard_id not in self._shard_slices:
            raise ValueError(f"unknown shard {shard_id!r}; expected one of {self.shard_ids}")
        offset, rows = self._shard_slices[shard_id]
        target = param.data.narrow(0, offset, rows)
        if target.shape != loaded.shape:
            raise ValueError(
                f"shape mismatch for shard {shard_id!r}: checkpoint {tuple(loaded.shape)} "
                f"vs model {tuple(target.shape)}"
            )
        target.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class ReplicatedLinear(LinearBase):
    """A plain linear layer loaded from one checkpoint tensor."""


class MergedLinear(LinearBase):
    """Several linear layers with the same input stacked along the output dim
    (e.g. gate_proj and up_proj -> gate_up_proj). Shard i covers rows
    sum(output_sizes[:i]) : sum(output_sizes[:i+1])."""

    def __init__(self, input_size: int, output_sizes: Sequence[int], bias: bool) -> None:
        super().__init__(input_size, sum(output_sizes), bias)
        self.output_sizes = list(output_sizes)
        offset = 0
        for i, size in enumerate(output_sizes):
            self._shard_slices[i] = (offset, size)
            offset += size


class QKVLinear(LinearBase):
    """q, k and v projections in one matrix; output rows are laid out as

    [ q: num_heads * head_dim | k: num_kv_heads * head_dim | v: num_kv_heads * head_dim ]
    """

    def __init__(
        self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool
    ) -> None:
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        super().__init__(hidden_size, q_size + 2 * kv_size, bias)
        self.q_size, self.kv_size = q_size, kv_size
        self._shard_slices = {
            "q": (0, q_size),
            "k": (q_size, kv_size),
            "v": (q_size + kv_size, kv_size),
        }
