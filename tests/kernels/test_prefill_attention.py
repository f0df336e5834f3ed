from __future__ import annotations

import pytest
import torch

from kestrel.kernels.attention.prefill import prefill_attention
from tests.kernels.paged_refs import attention_reference, make_paged_batch, rel_err, tolerance

# (query_len, seq_len): single tokens, full prompts, chunks on a cached prefix, lengths at and
# around tile (16) and block boundaries.
LENS = [(1, 1), (1, 9), (5, 5), (17, 40), (16, 16), (20, 33), (3, 64)]


def _run(batch, scale):
    out = torch.full_like(batch.q, torch.nan)  # poisoned: every element must be written
    prefill_attention(
        batch.q,
        batch.kv_cache,
        batch.block_table,
        batch.query_start_loc,
        batch.seq_lens,
        max(batch.q_lens),
        scale,
        out=out,
    )
    return out


@pytest.mark.parametrize(
    "num_q_heads,num_kv_heads,head_dim,block_size,dtype",
    [
        (2, 2, 16, 4, torch.float32),  # MHA
        (4, 2, 32, 16, torch.float16),  # GQA
        (4, 1, 16, 8, torch.float32),  # MQA
        (3, 1, 24, 4, torch.float16),  # group and head_dim not powers of two
    ],
)
def test_prefill_matches_dense(num_q_heads, num_kv_heads, head_dim, block_size, dtype, device):
    gen = torch.Generator().manual_seed(num_q_heads * 7 + num_kv_heads + head_dim + block_size)
    q_lens, seq_lens = zip(*LENS, strict=False)
    batch = make_paged_batch(
        list(q_lens),
        list(seq_lens),
        num_q_heads,
        num_kv_heads,
        head_dim,
        block_size,
        dtype,
        device,
        gen,
    )
    scale = head_dim**-0.5
    out = _run(batch, scale)
    assert torch.isfinite(out).all(), "unwritten output rows"
    err = rel_err(out, attention_reference(batch, scale))
    assert err < tolerance(dtype, device), f"rel err {err:.2e}"


def test_prefill_batch_slice_runs_against_absolute_rows(device):
    """query_start_loc[i:] with the same q/out computes requests i.. only (the backend's split)."""
    gen = torch.Generator().manual_seed(11)
    batch = make_paged_batch([1, 1, 9, 4], [7, 30, 12, 4], 4, 2, 16, 4, torch.float32, device, gen)
    out = torch.full_like(batch.q, torch.nan)
    prefill_attention(
        batch.q,
        batch.kv_cache,
        batch.block_table[2:],
        batch.query_start_loc[2:],
        batch.seq_lens[2:],
        9,
        0.25,
        out=out,
    )
    ref = attention_reference(batch, 0.25)
    assert torch.isnan(out[:2]).all()  # rows of requests 0 and 1 untouched
    assert rel_err(out[2:], ref[2:]) < tolerance(torch.float32, device)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_prefill_bf16_real_shapes(head_dim, device):
    gen = torch.Generator().manual_seed(head_dim)
    lens = [(1, 1), (1, 700), (128, 128), (129, 129), (1000, 1000), (300, 2049), (77, 4096)]
    q_lens, seq_lens = zip(*lens, strict=False)
    batch = make_paged_batch(
        list(q_lens),
        list(seq_lens),
        32,
        8,
        head_dim,
        16,
        torch.bfloat16,
        device,
        gen,
        extra_blocks=500,
    )
    out = _run(batch, head_dim**-0.5)
    assert torch.isfinite(out).all()
    assert rel_err(out, attention_reference(batch, head_dim**-0.5)) < 2e-2


@pytest.mark.gpu
def test_prefill_block_offsets_past_int32(device):
    """Blocks whose element offset exceeds 2**31 (a ~8.6 GB cache) are addressed correctly."""
    block_size, num_kv_heads, head_dim = 16, 1, 128
    per_block = block_size * num_kv_heads * head_dim
    num_blocks = 2**31 // per_block + 64
    cache = torch.empty(
        2, num_blocks, block_size, num_kv_heads, head_dim, dtype=torch.bfloat16, device=device
    )
    gen = torch.Generator().manual_seed(5)
    batch = make_paged_batch(
        [40, 1], [100, 33], 4, 1, head_dim, block_size, torch.bfloat16, device, gen, extra_blocks=0
    )
    ref = attention_reference(batch, head_dim**-0.5)  # on the small cache, before the move
    # Move every used block to the top of the big cache.
    old_ids = batch.block_table[:, :7].clone()
    new_ids = torch.arange(
        num_blocks - old_ids.numel(), num_blocks, device=device, dtype=torch.int32
    ).view_as(old_ids)
    used = old_ids < batch.kv_cache.shape[1]
    cache[:, new_ids[used].long()] = batch.kv_cache[:, old_ids[used].long()]
    batch.block_table[:, :7] = torch.where(used, new_ids, old_ids)
    batch.kv_cache = cache
    out = _run(batch, head_dim**-0.5)
    assert rel_err(out, ref) < 2e-2
    del cache
    torch.cuda.empty_cache()
