"""The sm_90 Gluon prefill kernel: it compiles for Hopper anywhere (ptxas ships with Triton,
so CPU CI catches API or layout breakage), and on an H100 it matches the float32 reference and
the portable Triton kernel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kestrel.kernels.attention import prefill_hopper as hopper
from kestrel.kernels.attention.prefill import default_prefill_config, prefill_attention
from tests.kernels.paged_refs import (
    attention_reference,
    make_paged_batch,
    rel_err,
    store_kv_reference,
)

SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def _compile_for_sm90(head_dim: int, page: int, dtype: torch.dtype, new_kv: bool):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    q = torch.zeros(8, 4, head_dim, dtype=dtype)
    cache = torch.zeros(2, 4, page, 2, head_dim, dtype=dtype)
    sub = min(page, hopper.BLOCK_N)
    kv = torch.zeros(8, 2, head_dim, dtype=dtype)
    descs = hopper._descriptors(q, cache, (kv, kv) if new_kv else None, sub)
    ptr = "*bf16" if dtype == torch.bfloat16 else "*fp16"
    names = ("q_desc", "k_desc", "v_desc", "kn_desc", "vn_desc")
    sig = dict(zip(names, map(mangle_type, descs), strict=True))
    sig.update(out_ptr=ptr, bt_ptr="*i32", qsl_ptr="*i32", seq_lens_ptr="*i32",
               qk_scale="fp32", stride_o_tok="i32", stride_o_head="i32", stride_bt_req="i32")
    consts = dict(GROUP=2, HEAD_DIM=head_dim, PAGE=page, SUB=sub, BLOCK_M=hopper.BLOCK_M,
                  BLOCK_N=hopper.BLOCK_N, STAGES=hopper.STAGES, NEW_KV=new_kv,
                  Q_REGS=new_kv,
                  num_warps=hopper.NUM_WARPS)
    sig.update(dict.fromkeys(consts, "constexpr"))
    src = GluonASTSource(hopper._prefill_kernel, sig, consts)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": hopper.NUM_WARPS})


COMPILE_CASES = [(128, 16, "bfloat16", True), (64, 16, "float16", False),
                 (128, 128, "bfloat16", False), (128, 32, "float16", True)]


def test_compiles_for_sm90_two_programs_per_sm():
    # NOTE: a fresh interpreter: under TRITON_INTERPRET (set for CPU runs) the standard-library
    # functions Gluon borrows from Triton are interpreter objects and cannot be compiled.
    code = (
        "import json, torch\n"
        "from tests.kernels.test_prefill_hopper import COMPILE_CASES, _compile_for_sm90\n"
        "print(json.dumps([_compile_for_sm90(h, p, getattr(torch, d), n).metadata.shared\n"
        "                  for h, p, d, n in COMPILE_CASES]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shared = json.loads(proc.stdout.strip().splitlines()[-1])
    # Two programs per SM is what overlaps one's softmax with the other's MMAs (228 KB per
    # SM, 1 KB of it reserved per program).
    for case, size in zip(COMPILE_CASES, shared, strict=True):
        assert 2 * (size + 1024) <= 228 * 1024, (case, size)


def test_dispatch_rule(device):
    q = torch.zeros(4, 8, 128, dtype=torch.bfloat16, device=device)
    cache = torch.zeros(2, 4, 16, 2, 128, dtype=torch.bfloat16, device=device)
    assert hopper.takes_hopper_prefill(q, cache, q) == SM90
    assert not hopper.takes_hopper_prefill(q[..., :96], cache[..., :96], q[..., :96])  # head_dim
    assert not hopper.takes_hopper_prefill(q.float(), cache.float(), q.float())  # dtype
    for page in (12, 8):  # not a power of two; more than 4 boxes per key tile
        odd = torch.zeros(2, 4, page, 2, 128, dtype=torch.bfloat16, device=device)
        assert not hopper.takes_hopper_prefill(q, odd, q)
    strided = torch.zeros(4, 8, 2, 128, dtype=torch.bfloat16, device=device)[:, :, 0]
    assert not hopper.takes_hopper_prefill(strided, cache, strided)  # heads not packed
    kv = torch.zeros(4, 2, 128, dtype=torch.bfloat16, device=device)
    assert hopper.takes_new_kv((kv, kv), q, cache)
    assert not hopper.takes_new_kv(None, q, cache)
    assert not hopper.takes_new_kv((kv[:3], kv[:3]), q, cache)  # rows not aligned with q
    assert not hopper.takes_new_kv((kv.half(), kv.half()), q, cache)  # dtype


# (query_len, seq_len): single tokens, whole prompts, chunks on cached prefixes that end
# inside a tile, lengths at and around the 64-row/64-key tiles, long contexts.
LENS = [(1, 1), (1, 700), (64, 64), (65, 65), (129, 129), (1000, 1000), (300, 2049),
        (77, 4096), (63, 127), (200, 263)]


@pytest.mark.gpu
@pytest.mark.skipif(not SM90, reason="needs an sm_90 GPU")
@pytest.mark.parametrize(
    "num_q_heads,num_kv_heads,head_dim,page,dtype",
    [(32, 8, 128, 16, torch.bfloat16), (8, 8, 64, 16, torch.float16),
     (16, 2, 128, 128, torch.bfloat16), (4, 1, 128, 32, torch.float16)],
)
def test_matches_reference_and_portable_kernel(num_q_heads, num_kv_heads, head_dim, page, dtype,
                                               device):
    gen = torch.Generator().manual_seed(num_q_heads + head_dim + page)
    q_lens, seq_lens = zip(*LENS, strict=True)
    batch = make_paged_batch(list(q_lens), list(seq_lens), num_q_heads, num_kv_heads, head_dim,
                             page, dtype, device, gen, extra_blocks=300)
    scale = head_dim**-0.5

    def run(config):
        out = torch.full_like(batch.q, torch.nan)  # poisoned: every row must be written
        prefill_attention(batch.q, batch.kv_cache, batch.block_table, batch.query_start_loc,
                          batch.seq_lens, max(q_lens), scale, out=out, config=config)
        return out

    assert hopper.takes_hopper_prefill(batch.q, batch.kv_cache, batch.q)
    ours = run(None)
    assert torch.isfinite(ours).all(), "unwritten or non-finite rows"
    assert rel_err(ours, attention_reference(batch, scale)) < 2e-2
    portable = run(default_prefill_config(batch.q.device, head_dim, max(q_lens)))
    assert rel_err(ours, portable) < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not SM90, reason="needs an sm_90 GPU")
def test_batch_slice_and_strided_q(device):
    """query_start_loc[i:] runs requests i.. against absolute rows, and q may be a view into
    a wider qkv row (as the model's split gives)."""
    gen = torch.Generator().manual_seed(3)
    batch = make_paged_batch([1, 1, 90, 40], [7, 30, 90, 300], 8, 2, 128, 16, torch.bfloat16,
                             device, gen)
    qkv = torch.randn(batch.q.shape[0], 12, 128, generator=gen).to(device, torch.bfloat16)
    qkv[:, :8] = batch.q
    q = qkv[:, :8]
    out = torch.full_like(batch.q, torch.nan)
    assert hopper.takes_hopper_prefill(q, batch.kv_cache, out)
    prefill_attention(q, batch.kv_cache, batch.block_table[2:], batch.query_start_loc[2:],
                      batch.seq_lens[2:], 90, 128**-0.5, out=out)
    assert torch.isnan(out[:2]).all()  # rows of requests 0 and 1 untouched
    assert rel_err(out[2:], attention_reference(batch, 128**-0.5)[2:]) < 2e-2


def _own_key_tiles(batch, block_n: int) -> torch.Tensor:
    """Cache slots of the keys the Hopper kernel reads from new_kv: whole key tiles of this
    step's keys (at or after the prefix, inside the request)."""
    slots = []
    page = batch.kv_cache.shape[2]
    for r, (ql, sl) in enumerate(zip(batch.q_lens, batch.seq_lens_list, strict=True)):
        for key0 in range(0, sl - block_n + 1, block_n):
            if key0 >= sl - ql:
                pos = torch.arange(key0, key0 + block_n)
                blocks = batch.block_table[r, pos // page].long().cpu()
                slots.append(blocks * page + pos % page)
    return torch.cat(slots)


@pytest.mark.gpu
@pytest.mark.skipif(not SM90, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("num_q_heads,num_kv_heads,page", [(32, 8, 16), (8, 8, 64)])
def test_new_kv_rows_replace_the_page_gather(num_q_heads, num_kv_heads, page, device):
    """With new_kv (views into a qkv buffer, as the model leaves them), whole tiles of a
    request's own keys come from those rows: the result is bit-identical to reading the cache,
    and stays right when the cache's copies of exactly those keys are poisoned."""
    gen = torch.Generator().manual_seed(page)
    q_lens, seq_lens = zip(*LENS, strict=True)
    batch = make_paged_batch(list(q_lens), list(seq_lens), num_q_heads, num_kv_heads, 128, page,
                             torch.bfloat16, device, gen, extra_blocks=300)
    store_kv_reference(batch)
    qkv = torch.cat([batch.q, batch.k_new, batch.v_new], dim=1)  # [T, hq + 2 hkv, d]
    q, k, v = qkv.split([num_q_heads, num_kv_heads, num_kv_heads], dim=1)
    assert hopper.takes_new_kv((k, v), q, batch.kv_cache)
    scale = 128**-0.5

    def run(new_kv):
        out = torch.full_like(batch.q, torch.nan)
        prefill_attention(q, batch.kv_cache, batch.block_table, batch.query_start_loc,
                          batch.seq_lens, max(q_lens), scale, out=out, new_kv=new_kv)
        return out

    from_cache = run(None)
    assert torch.equal(run((k, v)), from_cache)
    ref = attention_reference(batch, scale)
    assert rel_err(from_cache, ref) < 2e-2
    own = _own_key_tiles(batch, hopper.BLOCK_N).to(device)
    flat = batch.kv_cache.view(2, -1, num_kv_heads, 128)
    flat[:, own] = torch.nan
    assert torch.isnan(run(None)).any()  # the poison sits where the cache path reads
    poisoned_ok = run((k, v))
    assert torch.equal(poisoned_ok, from_cache)
