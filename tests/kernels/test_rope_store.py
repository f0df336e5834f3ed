from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from kestrel.kernels.kv_store import store_kv
from kestrel.kernels.norm import rms_norm
from kestrel.kernels.rope_store import heads_per_program, rope_store_kv, tokens_per_program
from kestrel.kernels.rotary import apply_rotary
from kestrel.layers.rotary import RotaryEmbedding
from tests.kernels.paged_refs import rel_err, tolerance
from tests.kernels.test_rotary import _reference as rotary_reference

EPS = 1e-6


@dataclass
class Case:
    qkv: torch.Tensor  # [T, (hq + 2 * hkv) * d]
    positions: torch.Tensor  # [T]
    cos_sin: torch.Tensor  # [max_pos, rotary_dim] float32
    kv_cache: torch.Tensor  # [2, num_blocks, block_size, hkv, d], NaN everywhere
    slots: torch.Tensor  # [T], some -1
    hq: int
    hkv: int
    d: int
    q_w: torch.Tensor | None
    k_w: torch.Tensor | None


def _case(
    hq: int,
    hkv: int,
    d: int,
    rotary_dim: int,
    dtype: torch.dtype,
    norm: bool,
    device: torch.device,
    *,
    num_tokens: int = 7,
    num_blocks: int = 40,
    block_size: int = 16,
    cache_dtype: torch.dtype | None = None,
    index_dtype: torch.dtype = torch.int64,
    seed: int = 0,
) -> Case:
    gen = torch.Generator().manual_seed(seed)
    qkv = 2 * torch.randn(num_tokens, (hq + 2 * hkv) * d, generator=gen)
    positions = torch.randint(0, 4096, (num_tokens,), generator=gen)  # ragged, unsorted
    positions[:1] = 0
    rope = RotaryEmbedding(rotary_dim, 4096, {"rope_type": "default", "rope_theta": 10000.0})
    num_slots = num_blocks * block_size
    slots = torch.randperm(num_slots - 1, generator=gen)[:num_tokens]
    slots[:1] = num_slots - 1  # the very last slot of the largest block id
    if num_tokens > 2:
        slots[1] = slots[-2] = -1  # padding rows
    kv_cache = torch.full((2, num_blocks, block_size, hkv, d), float("nan"))
    weights = [(1 + 0.2 * torch.randn(d, generator=gen)).to(dtype=dtype, device=device)
               for _ in range(2)] if norm else [None, None]  # fmt: skip
    return Case(
        qkv.to(dtype=dtype, device=device),
        positions.to(dtype=index_dtype, device=device),
        rope.cos_sin_cache.to(device),
        kv_cache.to(dtype=cache_dtype or dtype, device=device),
        slots.to(dtype=index_dtype, device=device),
        hq,
        hkv,
        d,
        *weights,
    )


def _split(c: Case, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = qkv.split([c.hq * c.d, c.hkv * c.d, c.hkv * c.d], dim=-1)
    t = qkv.shape[0]
    return q.view(t, c.hq, c.d), k.view(t, c.hkv, c.d), v.view(t, c.hkv, c.d)


def _unfused(c: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-layer kernel sequence the fused kernel replaces (as RopeAttention runs it)."""
    cache = c.kv_cache.clone()
    q, k, v = _split(c, c.qkv.clone())
    if c.q_w is not None:
        q = rms_norm(q.reshape(-1, c.d), c.q_w, EPS).view(q.shape)
        k = rms_norm(k.reshape(-1, c.d), c.k_w, EPS).view(k.shape)
    apply_rotary(q, k, c.positions, c.cos_sin)
    store_kv(k, v, cache, c.slots)
    return q, cache


def _fused(c: Case, per: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    qkv, cache = c.qkv.clone(), c.kv_cache.clone()
    q = rope_store_kv(
        qkv, c.positions, c.cos_sin, cache, c.slots, c.hq, c.hkv, c.d, c.q_w, c.k_w, EPS,
        tokens_per_prog=per,
    )
    assert q.shape == (qkv.shape[0], c.hq, c.d) and q.data_ptr() == qkv.data_ptr()
    assert torch.equal(qkv[:, c.hq * c.d :], c.qkv[:, c.hq * c.d :])  # k and v left unchanged
    return q, cache, qkv


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit equality that treats the NaN poison as equal to itself."""
    return a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)
    )


def _reference64(c: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k after norm + RoPE, in float64."""
    q, k, _ = (x.double() for x in _split(c, c.qkv))
    if c.q_w is not None:
        q, k = ((x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)) * w.double()
                for x, w in ((q, c.q_w), (k, c.k_w)))  # fmt: skip
    return rotary_reference(q, c.positions, c.cos_sin), rotary_reference(k, c.positions, c.cos_sin)


def _check_cache_writes(c: Case, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Only the target slots changed; returns the written (k, v) rows."""
    flat = cache.view(2, -1, c.hkv, c.d)
    valid = c.slots >= 0
    written = torch.zeros(flat.shape[1], dtype=torch.bool, device=cache.device)
    written[c.slots[valid].long()] = True
    assert torch.isnan(flat[:, ~written]).all(), "a slot outside slot_mapping was written"
    rows = flat[:, c.slots[valid].long()]
    assert not torch.isnan(rows).any()
    return rows[0], rows[1]


@pytest.mark.parametrize("hq,hkv,d,rotary_dim", [(4, 2, 64, 64), (2, 2, 128, 128), (4, 2, 64, 32)])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_store_matches_unfused_kernels(hq, hkv, d, rotary_dim, norm, dtype, device):
    c = _case(hq, hkv, d, rotary_dim, dtype, norm, device, seed=d + rotary_dim + norm)
    q_ref, cache_ref = _unfused(c)
    q, cache, _ = _fused(c)
    assert torch.equal(q, q_ref)
    assert _same_bits(cache, cache_ref)

    # ... and both are close to the float64 math.
    q64, k64 = _reference64(c)
    valid = c.slots >= 0
    k_rows, v_rows = _check_cache_writes(c, cache)
    tol = tolerance(dtype, device)
    assert rel_err(q, q64) < tol and rel_err(k_rows, k64[valid]) < tol
    assert torch.equal(v_rows, c.qkv[valid, (hq + hkv) * d :].view(-1, hkv, d))


@pytest.mark.parametrize("per", [2, 3, 16])
def test_rope_store_several_tokens_per_program(per, device):
    """Long prefill batches give each program a run of tokens (ragged last run included)."""
    c = _case(4, 2, 64, 64, torch.float16, True, device, num_tokens=11, seed=per)
    q_ref, cache_ref, _ = _fused(c, per=1)
    q, cache, _ = _fused(c, per=per)
    assert torch.equal(q, q_ref)
    assert _same_bits(cache, cache_ref)
    _check_cache_writes(c, cache)


@pytest.mark.parametrize("hq,hkv,d,rotary_dim,norm", [(4, 2, 64, 64, True), (4, 2, 64, 32, True),
                                                    (2, 2, 128, 96, False)])
def test_rope_store_write_k_leaves_the_cached_keys_in_qkv(hq, hkv, d, rotary_dim, norm, device):
    """With write_k the qkv rows' k part holds, bit for bit, what was stored for each slot;
    q and the cache are as without it, and v is untouched."""
    c = _case(hq, hkv, d, rotary_dim, torch.float16, norm, device, num_tokens=9, seed=d)
    q_ref, cache_ref, _ = _fused(c)
    qkv, cache = c.qkv.clone(), c.kv_cache.clone()
    q = rope_store_kv(qkv, c.positions, c.cos_sin, cache, c.slots, hq, hkv, d, c.q_w, c.k_w,
                      EPS, write_k=True)
    assert torch.equal(q, q_ref) and _same_bits(cache, cache_ref)
    _, k, v = _split(c, qkv)
    k_rows, _ = _check_cache_writes(c, cache)
    valid = c.slots >= 0
    assert torch.equal(k[valid], k_rows)
    assert rel_err(k, _reference64(c)[1]) < tolerance(torch.float16, device)  # padding rows too
    assert torch.equal(v, _split(c, c.qkv)[2])


def test_program_shape():
    cpu = torch.device("cpu")  # nominal 132 SMs
    assert heads_per_program(32, 8) == 8 and heads_per_program(6, 2) == 2
    assert heads_per_program(7, 1) == 1
    assert tokens_per_program(1, 40, cpu) == 1
    assert tokens_per_program(256, 40, cpu) == 1
    assert tokens_per_program(16384, 24, cpu) == 12
    assert tokens_per_program(2048, 40, cpu) == 3
    assert tokens_per_program(1 << 20, 40, cpu) == 16


def test_rope_store_large_block_ids_mixed_dtypes(device):
    # Slots in the last of 3000 blocks; k/v rounded to the activation dtype, then to the cache's;
    # int32 positions and slots.
    c = _case(
        4, 2, 64, 64, torch.float16, True, device, num_tokens=9, num_blocks=3000,
        cache_dtype=torch.float32, index_dtype=torch.int32, seed=7,
    )  # fmt: skip
    last = 3000 * 16 - 1
    slots = [last, -1, last - 12, 2998 * 16, 2000 * 16 + 15, 5, last - 8, -1, 1234]
    c.slots = torch.tensor(slots, dtype=torch.int32, device=device)
    q_ref, cache_ref = _unfused(c)
    q, cache, _ = _fused(c)
    assert torch.equal(q, q_ref)
    assert _same_bits(cache, cache_ref)
    _check_cache_writes(c, cache)


def test_rope_store_empty_and_bad_shapes(device):
    c = _case(4, 2, 64, 64, torch.float32, False, device, num_tokens=0)
    q, cache, _ = _fused(c)
    assert q.shape == (0, 4, 64) and _same_bits(cache, c.kv_cache)
    c = _case(4, 2, 64, 64, torch.float32, False, device)
    with pytest.raises(AssertionError, match="qkv"):
        rope_store_kv(c.qkv, c.positions, c.cos_sin, c.kv_cache, c.slots, 4, 4, 64)
    with pytest.raises(AssertionError, match="both"):
        rope_store_kv(c.qkv, c.positions, c.cos_sin, c.kv_cache, c.slots, 4, 2, 64, c.qkv[0])


@pytest.mark.gpu
@pytest.mark.parametrize(
    "hq,hkv,norm,num_tokens",
    [(16, 8, True, 300), (32, 8, False, 1)],
    ids=["qwen3-0.6b", "llama3-8b"],
)
def test_rope_store_bf16_real_shapes(hq, hkv, norm, num_tokens, device):
    c = _case(
        hq, hkv, 128, 128, torch.bfloat16, norm, device, num_tokens=num_tokens, num_blocks=4096,
        seed=num_tokens,
    )  # fmt: skip
    if num_tokens == 1:
        c.slots.fill_(4095 * 16 + 5)
    q_ref, cache_ref = _unfused(c)
    q, cache, _ = _fused(c)
    torch.cuda.synchronize()
    assert torch.equal(q, q_ref)
    assert _same_bits(cache, cache_ref)
