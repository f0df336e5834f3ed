"""ReferenceAttentionBackend vs dense causal attention computed directly in float64.

Each case is a varlen batch of (seq_len, query_len) requests: the first seq_len - query_len
tokens are already in the paged cache (written here by hand, not by the backend), the rest are
this step's queries. Block ids are shuffled so a request's blocks are scattered.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kestrel.attention.backend import AttentionMetadata
from kestrel.attention.reference import ReferenceAttentionBackend


def _dense_attention(q, k, v, scale):
    """q [qlen, hq, d]; k, v [seq_len, hkv, d] -> [qlen, hq, d]; queries are the last qlen."""
    query_len, num_q_heads, _ = q.shape
    seq_len, num_kv_heads, _ = k.shape
    kv_head = torch.arange(num_q_heads) // (num_q_heads // num_kv_heads)
    k, v = k[:, kv_head], v[:, kv_head]  # [seq_len, hq, d]
    mask = torch.ones(query_len, seq_len, dtype=torch.bool).tril(diagonal=seq_len - query_len)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).double(),
        k.transpose(0, 1).double(),
        v.transpose(0, 1).double(),
        attn_mask=mask,
        scale=scale,
    )
    return out.transpose(0, 1)


def _run_case(reqs, num_q_heads, num_kv_heads, head_dim, block_size, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)
    blocks_needed = [-(-seq_len // block_size) for seq_len, _ in reqs]
    num_blocks = sum(blocks_needed) + 3  # a few never-used blocks
    free = torch.randperm(num_blocks, generator=gen).tolist()
    kv_cache = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), float("nan"))
    kv_cache = kv_cache.to(dtype)  # NaN in unused slots: reading one poisons the output

    tables, full_kv, qs, ks, vs, slots, starts = [], [], [], [], [], [], [0]
    for (seq_len, query_len), n_blocks in zip(reqs, blocks_needed, strict=True):
        table = [free.pop() for _ in range(n_blocks)]
        k_all = randn(seq_len, num_kv_heads, head_dim)
        v_all = randn(seq_len, num_kv_heads, head_dim)
        for pos in range(seq_len - query_len):  # cached prefix from "earlier steps"
            kv_cache[0, table[pos // block_size], pos % block_size] = k_all[pos]
            kv_cache[1, table[pos // block_size], pos % block_size] = v_all[pos]
        new = range(seq_len - query_len, seq_len)
        slots += [table[p // block_size] * block_size + p % block_size for p in new]
        qs.append(randn(query_len, num_q_heads, head_dim))
        ks.append(k_all[seq_len - query_len :])
        vs.append(v_all[seq_len - query_len :])
        tables.append(table)
        full_kv.append((k_all, v_all))
        starts.append(starts[-1] + query_len)

    width = max(len(t) for t in tables)
    meta = AttentionMetadata(
        num_tokens=starts[-1],
        max_query_len=max(q for _, q in reqs),
        max_seq_len=max(s for s, _ in reqs),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor([s for s, _ in reqs], dtype=torch.int32),
        block_table=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc_cpu=starts,
        seq_lens_cpu=[s for s, _ in reqs],
    )
    scale = head_dim**-0.5
    out = ReferenceAttentionBackend().forward(
        torch.cat(qs), torch.cat(ks), torch.cat(vs), kv_cache, meta, scale
    )
    assert out.shape == (starts[-1], num_q_heads, head_dim) and out.dtype == dtype
    for r, (k_all, v_all) in enumerate(full_kv):
        expected = _dense_attention(qs[r], k_all, v_all, scale)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(
            out[starts[r] : starts[r + 1]].double(), expected, rtol=tol, atol=tol
        )
        # every position of the request is now in the cache where its block table says
        pos = torch.arange(k_all.shape[0])
        block_ids = torch.tensor(tables[r])[pos // block_size]
        assert torch.equal(kv_cache[0, block_ids, pos % block_size], k_all)
        assert torch.equal(kv_cache[1, block_ids, pos % block_size], v_all)


# (seq_len, query_len) per request
PREFILLS = [(1, 1), (5, 5), (16, 16), (17, 17), (33, 33)]
MIXED = [(9, 1), (20, 4), (1, 1), (32, 16), (40, 40), (17, 1), (16, 15)]


@pytest.mark.parametrize("num_q_heads, num_kv_heads", [(4, 4), (8, 2), (6, 1)], ids=str)
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("reqs", [PREFILLS, MIXED], ids=["prefills", "mixed"])
def test_matches_dense_attention(reqs, block_size, num_q_heads, num_kv_heads) -> None:
    _run_case(reqs, num_q_heads, num_kv_heads, 16, block_size, torch.float32)


def test_decode_only_batch() -> None:
    _run_case([(s, 1) for s in (1, 2, 15, 16, 17, 64)], 8, 2, 32, 16, torch.float32, seed=3)


def test_bfloat16_cast_back() -> None:
    _run_case(MIXED, 8, 2, 16, 4, torch.bfloat16, seed=5)


@pytest.mark.parametrize("seed", range(5))
def test_random_ragged_batches(seed: int) -> None:
    gen = torch.Generator().manual_seed(100 + seed)
    seq_lens = torch.randint(1, 50, (6,), generator=gen).tolist()
    reqs = [(s, int(torch.randint(1, s + 1, (1,), generator=gen))) for s in seq_lens]
    _run_case(reqs, 4, 2, 8, 8, torch.float32, seed=seed)


def test_padded_rows_are_ignored() -> None:
    block_size, heads, head_dim = 4, 2, 8
    kv_cache = torch.zeros(2, 4, block_size, heads, head_dim)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(5, heads, head_dim, generator=gen) for _ in range(3))  # 3 rows + 2 pad
    meta = AttentionMetadata(
        num_tokens=3,
        max_query_len=3,
        max_seq_len=3,
        query_start_loc=torch.tensor([0, 3], dtype=torch.int32),
        seq_lens=torch.tensor([3], dtype=torch.int32),
        block_table=torch.tensor([[2]], dtype=torch.int32),
        slot_mapping=torch.tensor([8, 9, 10, 0, 0], dtype=torch.int64),
        query_start_loc_cpu=[0, 3],
        seq_lens_cpu=[3],
    )
    out = ReferenceAttentionBackend().forward(q, k, v, kv_cache, meta, 0.5)
    expected = _dense_attention(q[:3], k[:3], v[:3], 0.5)
    torch.testing.assert_close(out[:3].double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.all(out[3:] == 0)
    assert torch.all(kv_cache[:, 0] == 0)  # padding rows wrote nothing
