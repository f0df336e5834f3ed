"""Pure-PyTorch paged attention: the correctness oracle for kernels and a CPU/debug backend.

Owns the plainest possible reading of the `AttentionBackend` contract: write k/v at
`slot_mapping`, then for each request gather its whole context through its block table and run
dense causal attention in float32. Must stay simple enough to be obviously right; speed is not
a goal.
"""

from __future__ import annotations

import torch

from kestrel.attention.backend import AttentionBackend, AttentionMetadata


class ReferenceAttentionBackend(AttentionBackend):
    name = "reference"

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
        out = torch.zeros_like(q)  # rows past num_tokens (padding) stay zero
        for r in range(meta.num_reqs):
            start, end = meta.query_start_loc_cpu[r], meta.query_start_loc_cpu[r + 1]
            keys, values = gather_context(kv_cache, meta.block_table[r], meta.seq_lens_cpu[r])
            out[start:end] = causal_attention(q[start:end], keys, values, scale).to(q.dtype)
        return out


def store_kv(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] flat slot = block * block_size + offset
) -> None:
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    flat = kv_cache.view(2, num_blocks * block_size, num_kv_heads, head_dim)
    flat[0, slot_mapping] = k.to(kv_cache.dtype)
    flat[1, slot_mapping] = v.to(kv_cache.dtype)


def gather_context(
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_row: torch.Tensor,  # [max_blocks_per_req] block ids of one request
    seq_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `seq_len` keys and values of one request, in position order."""
    block_size = kv_cache.shape[2]
    num_blocks = -(-seq_len // block_size)
    blocks = block_row[:num_blocks].long()
    # [num_blocks, block_size, kv_heads, head_dim] -> [seq_len, kv_heads, head_dim]
    keys = kv_cache[0, blocks].flatten(0, 1)[:seq_len]
    values = kv_cache[1, blocks].flatten(0, 1)[:seq_len]
    return keys, values


def causal_attention(
    q: torch.Tensor,  # [query_len, num_q_heads, head_dim]: the last query_len positions
    keys: torch.Tensor,  # [seq_len, num_kv_heads, head_dim]
    values: torch.Tensor,  # [seq_len, num_kv_heads, head_dim]
    scale: float,
) -> torch.Tensor:  # [query_len, num_q_heads, head_dim] float32
    """Dense attention where query i sits at position seq_len - query_len + i and sees keys at
    positions <= its own. Query head h reads KV head h // (num_q_heads // num_kv_heads)."""
    query_len, num_q_heads, _ = q.shape
    seq_len, num_kv_heads, _ = keys.shape
    group = num_q_heads // num_kv_heads
    keys = keys.float().repeat_interleave(group, dim=1)  # [seq_len, num_q_heads, head_dim]
    values = values.float().repeat_interleave(group, dim=1)  # [seq_len, num_q_heads, head_dim]
    scores = torch.einsum("qhd,khd->hqk", q.float(), keys) * scale  # [heads, query_len, seq_len]
    q_pos = torch.arange(seq_len - query_len, seq_len, device=q.device)[:, None]
    k_pos = torch.arange(seq_len, device=q.device)[None, :]
    scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, values)
