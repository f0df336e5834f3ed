"""Fused temperature sampling: one read of the logits per row, no probabilities materialized.

Owns the Gumbel-max kernel. Must not know about requests or sampling parameters beyond the
per-row temperature and noise seed it is given.

argmax_v(logit_v / T + G_v) with G_v = -log(-log(U_v)) i.i.d. Gumbel picks token v with
probability softmax(logit / T)_v, so neither the softmax nor its normalizer is needed. The
kernel ranks the same scores times log2(e), shifted by a constant:
logit_v * log2(e) / T - log2(-log2(U_v)), with the hardware's approximate base-2 log (one
instruction; the accurate float32 logs made the kernel compute-bound). U_v is
a 23-bit uniform from an integer hash of (row key, v), the key a hash of the row's 64-bit seed:
a row's draw depends on its seed alone, not on its batch. NOTE: a hash, not Philox: ten Philox
rounds per token made the kernel integer-bound at a quarter of the memory bandwidth, and two
hash rounds per token still made it integer-bound (one H100, 256 x 151,936 bf16 logits: 86 us
for 78 MB).
A row with T = 0 takes the plain argmax (greedy). Ties go to the smallest token id.

The vocabulary is split into chunks so that even one row fills the GPU; each program writes
its chunk's best (score, id) and a second small kernel picks the winner per row (one launch,
where argmax + gather + cast in torch were three).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kestrel.kernels.utils import cdiv, num_sms


@triton.jit
def _log2(x, FAST: tl.constexpr):
    """log2 of positive float32; FAST: the hardware approximation (MUFU, ~2 ulp), which
    tl.log2 does not emit. The interpreter has no inline PTX."""
    if FAST:
        return tl.inline_asm_elementwise(
            "lg2.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    return tl.log2(x)


@triton.jit
def _mix32(x):
    """A 32-bit avalanche hash (xor-shift-multiply), a bijection on uint32."""
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def _row_key(seed):
    """One 32-bit key per row from its 64-bit seed; scalar work, once per program."""
    lo = (seed & 0xFFFFFFFF).to(tl.uint32)
    hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    return _mix32(_mix32(lo) + hi)


@triton.jit
def _hash_uniform(key, idx):
    """Uniform in (0, 1) from (row key, index): one hash round per token (the kernel is bound
    by integer throughput), and the float built from the bits (1 + k / 2^23 minus 1, no
    int-to-float conversion, also a slow pipe): (k + 0.5) / 2^23 with k the hash's top 23
    bits, exact in float32 and never 0 or 1."""
    x = _mix32(idx.to(tl.uint32) * 0x9E3779B1 + key)
    one_plus = ((x >> 9) | 0x3F800000).to(tl.float32, bitcast=True)  # 1 + k / 2^23
    # One subtraction of 1 - 2^-24 (a float32): the exact result is representable.
    return one_plus - 0.99999994039535522


# NOTE: sizes that change with the batch are not specialized, so no batch size compiles a
# new variant in the middle of serving.
@triton.jit(do_not_specialize=["chunk", "num_chunks"])
def _gumbel_argmax_kernel(
    # pointers
    logits_ptr,  # [rows, vocab]
    temps_ptr,  # [rows] float32; 0 = greedy
    seeds_ptr,  # [rows] int64
    best_val_ptr,  # [rows, num_chunks] float32
    best_idx_ptr,  # [rows, num_chunks] int32
    # sizes
    vocab,
    chunk,
    num_chunks,
    # strides
    stride_logits,
    # meta
    BLOCK: tl.constexpr,
    FAST_LOG2: tl.constexpr,
):
    row = tl.program_id(0)
    pid = tl.program_id(1)
    temp = tl.load(temps_ptr + row)
    key = _row_key(tl.load(seeds_ptr + row))
    noisy = temp > 0.0
    scale = 1.4426950408889634 / tl.where(noisy, temp, 1.0)  # log2(e) / T
    base = logits_ptr + row.to(tl.int64) * stride_logits
    best_val = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK], dtype=tl.int32)
    start = pid * chunk
    for off in range(0, chunk, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        mask = idx < vocab
        score = tl.load(base + idx, mask=mask, other=float("-inf")).to(tl.float32)
        if noisy:
            u = _hash_uniform(key, idx)
            # u in (0, 1): both logs finite
            score = score * scale - _log2(-_log2(u, FAST_LOG2), FAST_LOG2)
        score = tl.where(mask, score, float("-inf"))
        better = score > best_val  # strict: the earlier (smaller) id wins ties
        best_val = tl.where(better, score, best_val)
        best_idx = tl.where(better, idx, best_idx)
    top = tl.max(best_val, axis=0)
    top_idx = tl.min(tl.where(best_val == top, best_idx, vocab), axis=0)
    tl.store(best_val_ptr + row * num_chunks + pid, top)
    tl.store(best_idx_ptr + row * num_chunks + pid, top_idx)


def gumbel_sample(
    logits: torch.Tensor, temperatures: torch.Tensor, seeds: torch.Tensor
) -> torch.Tensor:
    """One token id per row, drawn from softmax(logits / T) (argmax where T = 0).

    Args:
        logits: [rows, vocab] float32/bf16/fp16, last dim contiguous; -inf masks a token.
        temperatures: [rows] float32, >= 0.
        seeds: [rows] int64 noise keys; the same (seed, logits, T) gives the same token.

    Returns:
        [rows] int64 on the logits' device.
    """
    assert logits.dim() == 2 and logits.stride(1) == 1, f"logits {tuple(logits.shape)}"
    rows, vocab = logits.shape
    assert temperatures.shape == (rows,) and seeds.shape == (rows,), (
        f"temperatures {tuple(temperatures.shape)} seeds {tuple(seeds.shape)}"
    )
    if rows == 0:
        return torch.empty(0, dtype=torch.int64, device=logits.device)
    block = 1024 if vocab >= 1024 else triton.next_power_of_2(vocab)
    # Programs to cover every SM many times over (one H100, 32-256 rows: 32 per SM and 8 warps
    # were 15-18% faster than 4 per SM and 4 warps), each a whole number of blocks.
    want = max(1, cdiv(32 * num_sms(logits.device), rows))
    num_chunks = min(want, cdiv(vocab, block))
    chunk = cdiv(cdiv(vocab, num_chunks), block) * block
    num_chunks = cdiv(vocab, chunk)
    best_val = torch.empty(rows, num_chunks, dtype=torch.float32, device=logits.device)
    best_idx = torch.empty(rows, num_chunks, dtype=torch.int32, device=logits.device)
    _gumbel_argmax_kernel[(rows, num_chunks)](
        logits, temperatures, seeds, best_val, best_idx,
        vocab, chunk, num_chunks, logits.stride(0), BLOCK=block, num_warps=8,
        FAST_LOG2=logits.is_cuda,
    )
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    # NOTE: sized by the vocabulary, not the batch, so one variant serves every batch size.
    _pick_winner_kernel[(rows,)](
        best_val, best_idx, out, num_chunks, BLOCK=triton.next_power_of_2(cdiv(vocab, block)),
        num_warps=4,
    )
    return out


@triton.jit(do_not_specialize=["num_chunks"])
def _pick_winner_kernel(best_val_ptr, best_idx_ptr, out_ptr, num_chunks, BLOCK: tl.constexpr):
    """Per row, the id of the best chunk; chunks are in id order and the first maximum wins,
    so ties keep the smallest id."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < num_chunks
    vals = tl.load(best_val_ptr + row * num_chunks + offs, mask=mask, other=float("-inf"))
    top = tl.max(vals, axis=0)
    first = tl.min(tl.where(mask & (vals == top), offs, BLOCK), axis=0)
    first = tl.minimum(first, num_chunks - 1)  # NaN scores match nothing: stay in bounds
    idx = tl.load(best_idx_ptr + row * num_chunks + first)
    tl.store(out_ptr + row, idx.to(tl.int64))
