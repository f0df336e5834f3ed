"""The attention nn.Module: hands q/k/v of one layer to the step's attention backend.

Owns the reshape to heads, the lookup of this layer's KV cache in the forward context, and the
fused q/k norm + RoPE + K/V store path for backends that attend over an already-written cache.
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

    def fuses_rope_store(self, qkv: torch.Tensor) -> bool:
        """Whether this step's backend lets q/k norm, RoPE and the K/V store run as one kernel
        (`forward_qkv`)."""
        return qkv.is_cuda and get_forward_context().backend.attends_stored_kv

    def forward_qkv(
        self,
        qkv: torch.Tensor,  # [T, (heads + 2 * kv_heads) * head_dim]
        positions: torch.Tensor,  # [T]
        cos_sin_cache: torch.Tensor,  # [max_position, head_dim] float32
        q_norm_weight: torch.Tensor | None,
        k_norm_weight: torch.Tensor | None,
        eps: float,
    ) -> torch.Tensor:
        """Optional per-head q/k RMSNorm, RoPE and the K/V store in one kernel, then attention
        over the cache -> [T, heads * head_dim]."""
        from kestrel.kernels.rope_store import rope_store_kv

        ctx = get_forward_context()
        kv_cache, meta = ctx.kv_caches[self.layer_idx], ctx.attn_metadata
        # Prefill on Hopper reads a request's own keys from qkv rather than from their pages:
        # rotated k is then written back there too.
        new = ctx.backend.reads_new_kv(meta, kv_cache, qkv.dtype)
        q = rope_store_kv(
            qkv, positions, cos_sin_cache, kv_cache, meta.slot_mapping, self.num_heads,
            self.num_kv_heads, self.head_dim, q_norm_weight, k_norm_weight, eps, write_k=new,
        )  # [T, heads, head_dim]
        new_kv = None
        if new:
            kv_size = self.num_kv_heads * self.head_dim
            _, k, v = qkv.split([self.num_heads * self.head_dim, kv_size, kv_size], dim=-1)
            new_kv = tuple(x.view(-1, self.num_kv_heads, self.head_dim) for x in (k, v))
        out = ctx.backend.attend(q, kv_cache, meta, self.scale, new_kv)
        return out.reshape(out.shape[0], self.num_heads * self.head_dim)
