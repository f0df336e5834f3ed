"""Triton paged-attention backend: stores this step's K/V, then runs decode/prefill kernels.
Models that wrote K/V with the fused norm + RoPE + store kernel call `attend` directly.

Owns the dispatch from `AttentionMetadata` to kernels: a batch whose requests all have one
query goes to the split-KV decode kernel; otherwise leading one-token requests (the runner
places decodes first) go to the decode kernel and the rest to the varlen prefill kernel. Must
not build metadata or own KV memory.
"""

from __future__ import annotations

import torch

from kestrel.attention.backend import AttentionBackend, AttentionMetadata
from kestrel.kernels.attention import (
    choose_num_splits,
    decode_attention,
    prefill_attention,
    prefill_reads_new_kv,
)
from kestrel.kernels.kv_store import store_kv

# Decode batches from this many requests on launch their programs longest context first.
_ORDER_MIN_REQS = 32


def _count_leading_decodes(meta: AttentionMetadata) -> int:
    qsl = meta.query_start_loc_cpu
    num_reqs = meta.num_reqs
    if meta.max_query_len <= 1 and qsl[num_reqs] - qsl[0] == num_reqs:
        return num_reqs
    n = 0
    while n < num_reqs and qsl[n + 1] - qsl[n] == 1:
        n += 1
    return n


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    attends_stored_kv = True

    def __init__(self, decode_num_splits: int | None = None) -> None:
        # A fixed split count keeps decode grids static (CUDA graphs); None picks per step.
        self.decode_num_splits = decode_num_splits
        # The split point is the same for every layer of a step: compute it once per metadata.
        self._plan_meta: AttentionMetadata | None = None
        self._plan_num_decodes = 0
        self._plan_order: torch.Tensor | None = None
        # Zeroed scratch for the decode kernel's in-kernel split merge. A buffer is never
        # freed: CUDA graphs captured with it keep its address.
        self._semaphores = torch.zeros(0, dtype=torch.int32)
        self._retired: list[torch.Tensor] = []

    def _semaphores_for(self, n: int, device: torch.device) -> torch.Tensor:
        if self._semaphores.numel() < n or self._semaphores.device != device:
            self._retired.append(self._semaphores)
            self._semaphores = torch.zeros(max(n, 1 << 14), dtype=torch.int32, device=device)
        return self._semaphores

    def _plan(self, meta: AttentionMetadata) -> tuple[int, torch.Tensor | None]:
        """(leading decode requests, their launch order or None) of this step."""
        if meta is not self._plan_meta:
            self._plan_meta = meta
            n = self._plan_num_decodes = _count_leading_decodes(meta)
            # Longest contexts first: in a big batch of mixed lengths the kernel's tail is
            # then short requests (a sort of <= 512 lengths, once per step, graph-capturable).
            self._plan_order = (
                torch.argsort(meta.seq_lens[:n], descending=True) if n >= _ORDER_MIN_REQS
                else None
            )
        return self._plan_num_decodes, self._plan_order

    def _num_splits(
        self, meta: AttentionMetadata, num_decodes: int, num_kv_heads: int, device: torch.device
    ) -> int:
        if num_decodes < meta.num_reqs:
            # NOTE: next to a prefill, the decode rows are a small share of the step; one
            # split keeps a single compiled variant for all mixed steps.
            return 1
        if self.decode_num_splits is not None:
            return self.decode_num_splits
        return choose_num_splits(meta.split_batch_size or num_decodes, num_kv_heads, device)

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_q_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, num_q_heads, head_dim]
        store_kv(k, v, kv_cache, meta.slot_mapping)
        return self.attend(q, kv_cache, meta, scale)

    def reads_new_kv(
        self, meta: AttentionMetadata, kv_cache: torch.Tensor, dtype: torch.dtype
    ) -> bool:
        # Only the prefill kernel reads them, and only the Hopper one.
        return self._plan(meta)[0] < meta.num_reqs and prefill_reads_new_kv(kv_cache, dtype)

    def attend(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        out = torch.empty_like(q)
        num_reqs = meta.num_reqs
        if num_reqs == 0:
            return out
        num_decodes, order = self._plan(meta)
        if num_decodes > 0:
            # NOTE: leading one-token requests own q rows qsl[0] + r, r < num_decodes.
            first = meta.query_start_loc_cpu[0]
            rows = slice(first, first + num_decodes)
            decode_attention(
                q[rows],
                kv_cache,
                meta.block_table[:num_decodes],
                meta.seq_lens[:num_decodes],
                scale,
                num_splits=self._num_splits(meta, num_decodes, kv_cache.shape[3], q.device),
                out=out[rows],
                order=order,
                semaphores=self._semaphores_for(num_decodes * kv_cache.shape[3], q.device),
            )
        if num_decodes < num_reqs:
            prefill_attention(
                q,
                kv_cache,
                meta.block_table[num_decodes:],
                meta.query_start_loc[num_decodes:],
                meta.seq_lens[num_decodes:],
                meta.max_query_len,
                scale,
                out=out,
                new_kv=new_kv,
            )
        return out
