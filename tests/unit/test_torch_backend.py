"""The batched-decode torch backend against the reference oracle on random paged batches."""

from __future__ import annotations

import random

import pytest
import torch

from kestrel.attention.backend import AttentionMetadata
from kestrel.attention.reference import ReferenceAttentionBackend
from kestrel.attention.torch_backend import TorchAttentionBackend


def _batch(seed: int, q_lens: list[int], ctx_lens: list[int], heads: tuple[int, int],
           block_size: int, head_dim: int = 16):
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    num_q, num_kv = heads
    seq_lens = [c + n for c, n in zip(ctx_lens, q_lens)]
    per_req = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(per_req) + 3
    ids = list(range(num_blocks))
    rng.shuffle(ids)
    tables, slots, qsl = [], [], [0]
    for n, s, nb in zip(q_lens, seq_lens, per_req):
        row = [ids.pop() for _ in range(nb)]
        tables.append(row)
        slots += [row[p // block_size] * block_size + p % block_size for p in range(s - n, s)]
        qsl.append(qsl[-1] + n)
    width = max(per_req)
    table = torch.tensor([r + [0] * (width - len(r)) for r in tables], dtype=torch.int32)
    t = qsl[-1]
    meta = AttentionMetadata(
        num_tokens=t, max_query_len=max(q_lens), max_seq_len=max(seq_lens),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_table=table,
        slot_mapping=torch.tensor(slots), query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens,
    )
    cache = torch.randn(2, num_blocks, block_size, num_kv, head_dim, generator=gen)
    q = torch.randn(t, num_q, head_dim, generator=gen)
    k = torch.randn(t, num_kv, head_dim, generator=gen)
    v = torch.randn(t, num_kv, head_dim, generator=gen)
    return q, k, v, cache, meta


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_matches_reference(seed, heads, block_size):
    rng = random.Random(seed)
    num_reqs = rng.randint(1, 7)
    q_lens = [rng.choice([1, 1, 1, rng.randint(2, 20)]) for _ in range(num_reqs)]
    ctx_lens = [rng.randint(0, 40) for _ in range(num_reqs)]
    q, k, v, cache, meta = _batch(seed, q_lens, ctx_lens, heads, block_size)
    ref_cache, fast_cache = cache.clone(), cache.clone()
    ref = ReferenceAttentionBackend().forward(q, k, v, ref_cache, meta, 0.25)
    fast = TorchAttentionBackend().forward(q, k, v, fast_cache, meta, 0.25)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(fast_cache, ref_cache)
