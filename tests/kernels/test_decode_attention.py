from __future__ import annotations

import pytest
import torch

from kestrel.kernels.attention.decode import (
    FUSED_MERGE_MAX_SPLITS,
    choose_num_splits,
    decode_attention,
)
from tests.kernels.paged_refs import attention_reference, make_paged_batch, rel_err, tolerance

# Context lengths at and around block/tile boundaries, incl. a single-token context.
SEQ_LENS = [1, 16, 17, 33, 64, 7, 95]


def _run(batch, num_splits, scale):
    out = torch.full_like(batch.q, torch.nan)  # poisoned: every element must be written
    decode_attention(
        batch.q,
        batch.kv_cache,
        batch.block_table,
        batch.seq_lens,
        scale,
        num_splits=num_splits,
        out=out,
    )
    return out


@pytest.mark.parametrize(
    "num_q_heads,num_kv_heads,head_dim,block_size,dtype",
    [
        (2, 2, 16, 4, torch.float32),  # MHA
        (4, 2, 32, 16, torch.float16),  # GQA
        (8, 1, 16, 8, torch.float32),  # MQA
        (6, 2, 24, 4, torch.float16),  # group and head_dim not powers of two
    ],
)
def test_decode_matches_dense(num_q_heads, num_kv_heads, head_dim, block_size, dtype, device):
    gen = torch.Generator().manual_seed(num_q_heads * 7 + num_kv_heads + head_dim + block_size)
    batch = make_paged_batch(
        [1] * len(SEQ_LENS),
        SEQ_LENS,
        num_q_heads,
        num_kv_heads,
        head_dim,
        block_size,
        dtype,
        device,
        gen,
    )
    scale = head_dim**-0.5
    ref = attention_reference(batch, scale)
    for num_splits in (1, 3, 8):  # 8: more splits than most requests have tiles
        out = _run(batch, num_splits, scale)
        assert torch.isfinite(out).all(), f"unwritten output with {num_splits} splits"
        err = rel_err(out, ref)
        assert err < tolerance(dtype, device), f"num_splits={num_splits}: rel err {err:.2e}"


def test_decode_padded_request_gives_zeros(device):
    gen = torch.Generator().manual_seed(3)
    batch = make_paged_batch([1, 1], [5, 20], 4, 2, 16, 4, torch.float32, device, gen)
    batch.seq_lens[0] = 0  # a padding row, as a CUDA-graph batch would carry
    for num_splits in (1, 2):
        out = _run(batch, num_splits, 0.25)
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        assert torch.isfinite(out[1]).all()


def test_choose_num_splits_fills_the_gpu():
    cpu = torch.device("cpu")  # nominal 132 SMs
    assert choose_num_splits(512, 8, cpu) == 1
    assert choose_num_splits(64, 8, cpu) == 1
    assert choose_num_splits(1, 8, cpu) == 33
    assert choose_num_splits(4, 8, cpu) == 9
    assert choose_num_splits(1, 1, cpu) == 64  # at most 64


@pytest.mark.gpu
@pytest.mark.parametrize("batch_size,max_ctx", [(1, 8192), (8, 2000), (64, 600)])
def test_decode_bf16_real_shapes(batch_size, max_ctx, device):
    gen = torch.Generator().manual_seed(batch_size)
    seq_lens = torch.randint(1, max_ctx + 1, (batch_size,), generator=gen).tolist()
    seq_lens[0] = max_ctx
    batch = make_paged_batch(
        [1] * batch_size, seq_lens, 32, 8, 128, 16, torch.bfloat16, device, gen, extra_blocks=300
    )
    ref = attention_reference(batch, 128**-0.5)
    for num_splits in (None, 1, 7):
        out = _run(batch, num_splits, 128**-0.5)
        assert torch.isfinite(out).all()
        assert rel_err(out, ref) < tolerance(torch.bfloat16, device)


def test_decode_launch_order_does_not_change_results(device):
    gen = torch.Generator().manual_seed(5)
    batch = make_paged_batch([1] * 6, [9, 40, 1, 23, 64, 17], 4, 2, 16, 4, torch.float32, device,
                             gen)
    order = torch.argsort(batch.seq_lens, descending=True)
    for num_splits in (1, 2):
        plain = _run(batch, num_splits, 0.25)
        out = torch.full_like(batch.q, torch.nan)
        decode_attention(batch.q, batch.kv_cache, batch.block_table, batch.seq_lens,
                         0.25, num_splits=num_splits, out=out, order=order)
        assert torch.equal(out, plain)


@pytest.mark.parametrize("num_splits", [2, FUSED_MERGE_MAX_SPLITS])
def test_decode_fused_merge(num_splits, device):
    """With semaphores, the last split of each request merges in the kernel: same result as
    the separate merge, every output written, and the semaphores left zeroed for reuse."""
    gen = torch.Generator().manual_seed(num_splits)
    batch = make_paged_batch([1] * len(SEQ_LENS), SEQ_LENS, 4, 2, 16, 4, torch.float32, device,
                             gen)
    batch.seq_lens[2] = 0  # a padding row: out = 0
    sems = torch.zeros(64, dtype=torch.int32, device=device)
    separate = _run(batch, num_splits, 0.25)
    for _ in range(2):  # a second launch reuses the semaphores
        out = torch.full_like(batch.q, torch.nan)
        decode_attention(batch.q, batch.kv_cache, batch.block_table, batch.seq_lens, 0.25,
                         num_splits=num_splits, out=out, semaphores=sems)
        assert torch.isfinite(out).all() and torch.equal(out[2], torch.zeros_like(out[2]))
        assert rel_err(out, separate) < 1e-5
        assert not sems.any()
