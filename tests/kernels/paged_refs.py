"""Helpers for kernel tests: random paged batches and float32 dense references."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def tolerance(dtype: torch.dtype, device: torch.device) -> float:
    """Relative-norm tolerance: fp32 dots run as tf32 on GPU, exactly in the interpreter."""
    if dtype == torch.float32:
        return 1e-5 if device.type == "cpu" else 5e-3
    return 5e-3 if dtype == torch.float16 else 2e-2


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-12)).item()


@dataclass
class PagedBatch:
    q: torch.Tensor  # [num_tokens, num_q_heads, head_dim]
    k_new: torch.Tensor  # [num_tokens, num_kv_heads, head_dim]
    v_new: torch.Tensor  # [num_tokens, num_kv_heads, head_dim]
    kv_cache: torch.Tensor  # [2, num_blocks, block_size, num_kv_heads, head_dim], prefix filled
    block_table: torch.Tensor  # [num_reqs, max_blocks] int32
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32
    seq_lens: torch.Tensor  # [num_reqs] int32
    slot_mapping: torch.Tensor  # [num_tokens] int64
    q_lens: list[int]
    seq_lens_list: list[int]


def make_paged_batch(
    q_lens: list[int],
    seq_lens: list[int],
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    gen: torch.Generator,
    extra_blocks: int = 7,
) -> PagedBatch:
    """A varlen batch whose requests own shuffled, non-contiguous cache blocks.

    The cache holds random values everywhere (prefix keys included); this step's k/v are
    fresh random rows not yet stored.
    """
    assert all(1 <= s and q <= s for q, s in zip(q_lens, seq_lens, strict=False))
    blocks_per_req = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_req) + extra_blocks
    perm = torch.randperm(num_blocks, generator=gen)  # shuffled ids, the largest ones included
    max_blocks = max(blocks_per_req) + 2
    # Unused table entries point past the cache: a kernel that reads them faults or differs.
    block_table = torch.full((len(q_lens), max_blocks), 10**6, dtype=torch.int32)
    slot_mapping: list[int] = []
    used = 0
    for r, (ql, sl) in enumerate(zip(q_lens, seq_lens, strict=False)):
        ids = perm[used : used + blocks_per_req[r]]
        used += blocks_per_req[r]
        block_table[r, : len(ids)] = ids.to(torch.int32)
        for pos in range(sl - ql, sl):
            slot_mapping.append(int(ids[pos // block_size]) * block_size + pos % block_size)
    num_tokens = sum(q_lens)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)

    qsl = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return PagedBatch(
        q=rand(num_tokens, num_q_heads, head_dim),
        k_new=rand(num_tokens, num_kv_heads, head_dim),
        v_new=rand(num_tokens, num_kv_heads, head_dim),
        kv_cache=rand(2, num_blocks, block_size, num_kv_heads, head_dim),
        block_table=block_table.to(device),
        query_start_loc=qsl.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64, device=device),
        q_lens=list(q_lens),
        seq_lens_list=list(seq_lens),
    )


def store_kv_reference(batch: PagedBatch) -> None:
    """Write the batch's new k/v into its cache with plain indexing."""
    cache = batch.kv_cache
    num_blocks, block_size = cache.shape[1], cache.shape[2]
    flat = cache.view(2, num_blocks * block_size, *cache.shape[3:])
    flat[0, batch.slot_mapping] = batch.k_new
    flat[1, batch.slot_mapping] = batch.v_new


def gather_context(batch: PagedBatch, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of request r's context, [seq_len, num_kv_heads, head_dim] each."""
    block_size = batch.kv_cache.shape[2]
    sl = batch.seq_lens_list[r]
    pos = torch.arange(sl, device=batch.kv_cache.device)
    blocks = batch.block_table[r, pos // block_size].long()
    k = batch.kv_cache[0, blocks, pos % block_size]
    v = batch.kv_cache[1, blocks, pos % block_size]
    return k, v


def attention_reference(batch: PagedBatch, scale: float) -> torch.Tensor:
    """Dense causal attention per request in float32 over the gathered cache context."""
    num_q_heads = batch.q.shape[1]
    out = torch.empty(batch.q.shape, dtype=torch.float32, device=batch.q.device)
    start = 0
    for r, (ql, sl) in enumerate(zip(batch.q_lens, batch.seq_lens_list, strict=False)):
        k, v = gather_context(batch, r)
        group = num_q_heads // k.shape[1]
        k = k.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [H, sl, D]
        v = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
        q = batch.q[start : start + ql].float().transpose(0, 1)  # [H, ql, D]
        scores = (q @ k.transpose(1, 2)) * scale  # [H, ql, sl]
        q_pos = torch.arange(sl - ql, sl, device=q.device)[:, None]
        scores = scores.masked_fill(torch.arange(sl, device=q.device)[None, :] > q_pos, -torch.inf)
        out[start : start + ql] = (scores.softmax(-1) @ v).transpose(0, 1)
        start += ql
    return out
