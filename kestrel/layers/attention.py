"""The attention nn.Module: hands q/k/v of one layer to the step's attention backend.

Owns the reshape to heads and the lookup of this layer's KV cache in the forward context.
Must not implement attention math (backends do) or know how metadata is built (the runner does).
"""

from __future__ import annotations

import torch
from torch import nn

from kestrel.runner.forward_context import get_forward_context


class Attention(nn.Module):
    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, layer_idx: int
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of {num_kv_heads=}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.layer_idx = layer_idx

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, heads, head_dim], k/v [T, kv_heads, head_dim] -> [T, heads * head_dim]."""
        ctx = get_forward_context()
        kv_cache = ctx.kv_caches[self.layer_idx]  # [2, num_blocks, block_size, kv_heads, head_dim]
        out = ctx.backend.forward(q, k, v, kv_cache, ctx.attn_metadata, self.scale)
        return out.reshape(out.shape[0], self.num_heads * self.head_dim)
