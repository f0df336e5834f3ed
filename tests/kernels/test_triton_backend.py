from __future__ import annotations

import dataclasses

import pytest
import torch

from kestrel.attention.backend import AttentionMetadata
from kestrel.attention.triton_backend import TritonAttentionBackend
from tests.kernels.paged_refs import (
    PagedBatch,
    attention_reference,
    make_paged_batch,
    rel_err,
    store_kv_reference,
    tolerance,
)


def _metadata(batch: PagedBatch, num_pad: int = 0) -> AttentionMetadata:
    qsl = [0]
    for ql in batch.q_lens:
        qsl.append(qsl[-1] + ql)
    pad = torch.full((num_pad,), -1, dtype=torch.int64, device=batch.slot_mapping.device)
    return AttentionMetadata(
        num_tokens=qsl[-1] + num_pad,
        max_query_len=max(batch.q_lens),
        max_seq_len=max(batch.seq_lens_list),
        query_start_loc=batch.query_start_loc,
        seq_lens=batch.seq_lens,
        block_table=batch.block_table,
        slot_mapping=torch.cat([batch.slot_mapping, pad]),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=list(batch.seq_lens_list),
    )


def _pad_rows(t: torch.Tensor, num_pad: int) -> torch.Tensor:
    return torch.cat([t, torch.randn_like(t[:1]).expand(num_pad, -1, -1)]) if num_pad else t


@pytest.mark.parametrize(
    "q_lens,seq_lens",
    [
        ([1, 1, 1], [1, 17, 40]),  # all decode
        ([1, 1, 6, 17], [9, 33, 6, 40]),  # leading decodes, then prefills
        ([5, 1, 16], [21, 8, 16]),  # a decode in the middle goes through prefill
        ([1] * 33, [(7 * i) % 41 + 1 for i in range(33)]),  # big batch: launched longest first
    ],
)
def test_backend_stores_then_attends(q_lens, seq_lens, device):
    gen = torch.Generator().manual_seed(sum(seq_lens))
    batch = make_paged_batch(q_lens, seq_lens, 4, 2, 16, 4, torch.float32, device, gen)
    num_pad = 2  # CUDA-graph style padding rows: slot -1, outside every request
    meta = _metadata(batch, num_pad)
    q = _pad_rows(batch.q, num_pad)
    k, v = _pad_rows(batch.k_new, num_pad), _pad_rows(batch.v_new, num_pad)

    expected = dataclasses.replace(batch, kv_cache=batch.kv_cache.clone())
    store_kv_reference(expected)
    ref = attention_reference(expected, 0.25)

    backend = TritonAttentionBackend()
    out = backend.forward(q, k, v, batch.kv_cache, meta, 0.25)
    assert out.shape == q.shape
    assert torch.equal(batch.kv_cache, expected.kv_cache)
    real = out[: meta.query_start_loc_cpu[-1]]
    assert torch.isfinite(real).all()
    assert rel_err(real, ref) < tolerance(torch.float32, device)
    # Same metadata again (next layer): the cached split plan must still hold.
    again = backend.forward(q, k, v, batch.kv_cache, meta, 0.25)
    assert torch.equal(again[: meta.query_start_loc_cpu[-1]], real)


@pytest.mark.gpu
def test_backend_bf16_mixed_batch(device):
    gen = torch.Generator().manual_seed(0)
    q_lens = [1] * 24 + [512, 77, 1]
    seq_lens = torch.randint(1, 3000, (24,), generator=gen).tolist() + [512, 2000, 100]
    batch = make_paged_batch(q_lens, seq_lens, 32, 8, 128, 16, torch.bfloat16, device, gen)
    expected = dataclasses.replace(batch, kv_cache=batch.kv_cache.clone())
    store_kv_reference(expected)
    out = TritonAttentionBackend().forward(
        batch.q, batch.k_new, batch.v_new, batch.kv_cache, _metadata(batch), 128**-0.5
    )
    assert torch.equal(batch.kv_cache, expected.kv_cache)
    assert rel_err(out, attention_reference(expected, 128**-0.5)) < 2e-2
    # The model's fused path: K/V already stored, this step's rows passed along as new_kv.
    backend = TritonAttentionBackend()
    meta = _metadata(batch)
    assert backend.reads_new_kv(meta, batch.kv_cache, torch.bfloat16) == (
        torch.cuda.get_device_capability() == (9, 0)
    )
    again = backend.attend(batch.q, batch.kv_cache, meta, 128**-0.5,
                           new_kv=(batch.k_new, batch.v_new))
    assert torch.equal(again, out)
