from __future__ import annotations

import dataclasses

import pytest
import torch

from kestrel.kernels.kv_store import store_kv
from tests.kernels.paged_refs import make_paged_batch, store_kv_reference


@pytest.mark.parametrize("num_kv_heads,head_dim", [(1, 16), (2, 32), (3, 24)])
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_store_kv_matches_indexing(num_kv_heads, head_dim, block_size, dtype, device):
    gen = torch.Generator().manual_seed(num_kv_heads * 100 + head_dim + block_size)
    batch = make_paged_batch(
        [1, 7, 3, 20],
        [9, 7, 30, 20],
        2 * num_kv_heads,
        num_kv_heads,
        head_dim,
        block_size,
        dtype,
        device,
        gen,
    )
    expected = dataclasses.replace(batch, kv_cache=batch.kv_cache.clone())
    store_kv_reference(expected)
    store_kv(batch.k_new, batch.v_new, batch.kv_cache, batch.slot_mapping)
    # Bit-exact: a store is a copy.
    assert torch.equal(batch.kv_cache, expected.kv_cache)


def test_store_kv_skips_padding_and_accepts_strided_views(device):
    gen = torch.Generator().manual_seed(0)
    num_kv_heads, head_dim, block_size = 2, 16, 8
    cache = torch.randn(2, 6, block_size, num_kv_heads, head_dim, generator=gen).to(device)
    # k and v as views of one fused [tokens, 2 * heads, dim] projection (non-contiguous rows).
    kv = torch.randn(5, 2 * num_kv_heads, head_dim, generator=gen).to(device)
    k, v = kv[:, :num_kv_heads], kv[:, num_kv_heads:]
    slots = torch.tensor([17, -1, 40, -1, 3], dtype=torch.int64, device=device)
    expected = cache.clone()
    flat = expected.view(2, -1, num_kv_heads, head_dim)
    keep = slots >= 0
    flat[0, slots[keep]] = k[keep]
    flat[1, slots[keep]] = v[keep]
    store_kv(k, v, cache, slots)
    assert torch.equal(cache, expected)


@pytest.mark.gpu
def test_store_kv_bf16_real_shapes(device):
    gen = torch.Generator().manual_seed(1)
    batch = make_paged_batch(
        [1, 511, 1, 2048],
        [700, 511, 4097, 3000],
        32,
        8,
        128,
        16,
        torch.bfloat16,
        device,
        gen,
        extra_blocks=1000,
    )
    expected = batch.kv_cache.clone()
    flat = expected.view(2, -1, 8, 128)
    flat[0, batch.slot_mapping] = batch.k_new
    flat[1, batch.slot_mapping] = batch.v_new
    store_kv(batch.k_new, batch.v_new, batch.kv_cache, batch.slot_mapping)
    torch.cuda.synchronize()
    assert torch.equal(batch.kv_cache, expected)
