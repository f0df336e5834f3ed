"""Paged attention in plain PyTorch with batched decode: the default CPU backend.

Owns speed on machines without Triton GPUs: all one-query (decode) requests of a step are
gathered into one padded batch and attended with a single `scaled_dot_product_attention`
call; multi-query (prefill) requests use the reference path one by one. Must give the same
results as `reference.py`, which stays the oracle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kestrel.attention.backend import AttentionBackend, AttentionMetadata
from kestrel.attention.reference import causal_attention, gather_context, store_kv


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_q_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, num_q_heads, head_dim]
        n = meta.num_tokens
        store_kv(k[:n], v[:n], kv_cache, meta.slot_mapping[:n])
        out = torch.zeros_like(q)
        qsl = meta.query_start_loc_cpu
        decodes = [r for r in range(meta.num_reqs) if qsl[r + 1] - qsl[r] == 1]
        if decodes:
            rows = torch.tensor([qsl[r] for r in decodes], device=q.device)
            out[rows] = _batched_decode(q[rows], kv_cache, meta, decodes, scale).to(q.dtype)
        for r in range(meta.num_reqs):
            start, end = qsl[r], qsl[r + 1]
            if end - start > 1:
                keys, values = gather_context(kv_cache, meta.block_table[r], meta.seq_lens_cpu[r])
                out[start:end] = causal_attention(q[start:end], keys, values, scale).to(q.dtype)
        return out


def _batched_decode(
    q: torch.Tensor,  # [num_decodes, num_q_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    meta: AttentionMetadata,
    reqs: list[int],
    scale: float,
) -> torch.Tensor:  # [num_decodes, num_q_heads, head_dim] float32
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    seq_lens = [meta.seq_lens_cpu[r] for r in reqs]
    max_len = max(seq_lens)
    num_blocks = -(-max_len // block_size)
    idx = torch.tensor(reqs, device=q.device)
    table = meta.block_table[idx, :num_blocks].long()  # [D, num_blocks]
    # [D, num_blocks, block_size, kv_heads, head_dim] -> [D, kv_heads, max_len, head_dim]
    keys = kv_cache[0, table].flatten(1, 2)[:, :max_len].transpose(1, 2).float()
    values = kv_cache[1, table].flatten(1, 2)[:, :max_len].transpose(1, 2).float()
    group = q.shape[1] // num_kv_heads
    keys = keys.repeat_interleave(group, dim=1)  # [D, num_q_heads, max_len, head_dim]
    values = values.repeat_interleave(group, dim=1)
    lens = torch.tensor(seq_lens, device=q.device)
    valid = torch.arange(max_len, device=q.device)[None, :] < lens[:, None]  # [D, max_len]
    out = F.scaled_dot_product_attention(
        q.float().unsqueeze(2), keys, values, attn_mask=valid[:, None, None, :], scale=scale
    )  # [D, num_q_heads, 1, head_dim]
    return out.squeeze(2)
