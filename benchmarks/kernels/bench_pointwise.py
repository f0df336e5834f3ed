"""Benchmark the memory-bound kernels (kv_store, rms_norm, rotary, silu_and_mul) vs eager torch.

    python benchmarks/kernels/bench_pointwise.py

Each row reports achieved TB/s, counting every byte the kernel must read and write once, next
to the measured device copy bandwidth.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from bench_utils import bench_rotating, copy_bandwidth_tbps, device_summary, print_table

from kestrel.kernels.activation import silu_and_mul
from kestrel.kernels.kv_store import store_kv
from kestrel.kernels.norm import rms_norm
from kestrel.kernels.rotary import apply_rotary

DTYPE = torch.bfloat16
T = 8192  # tokens per step (a large prefill chunk)


def _rand(*shape: int, dtype: torch.dtype = DTYPE) -> torch.Tensor:
    return torch.randn(*shape, device="cuda", dtype=dtype)


def kv_store_rows():
    hkv, d, page = 8, 128, 16
    pages = 4 * T // page
    cache = _rand(2, pages, page, hkv, d)
    sets = [
        (_rand(T, hkv, d), _rand(T, hkv, d), torch.randperm(pages * page, device="cuda")[:T])
        for _ in range(2)
    ]
    flat = cache.view(2, -1, hkv, d)

    def eager(k, v, slots):
        flat[0, slots] = k
        flat[1, slots] = v

    nbytes = 2 * 2 * T * hkv * d * DTYPE.itemsize
    return [
        (
            "kv_store",
            "kestrel",
            bench_rotating(lambda k, v, s: store_kv(k, v, cache, s), sets),
            nbytes,
        ),
        ("kv_store", "torch index_put", bench_rotating(eager, sets), nbytes),
    ]


def rms_norm_rows():
    hidden = 4096
    w = _rand(hidden)
    sets = [(_rand(T, hidden), _rand(T, hidden)) for _ in range(2)]

    def eager(x, res):
        s = x + res
        sf = s.float()
        return w * (sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(DTYPE), s

    nbytes = 4 * T * hidden * DTYPE.itemsize  # read x, residual; write out, new residual
    return [
        (
            "rms_norm+res",
            "kestrel",
            bench_rotating(lambda x, r: rms_norm(x, w, 1e-6, r), sets),
            nbytes,
        ),
        ("rms_norm+res", "torch eager", bench_rotating(eager, sets), nbytes),
    ]


def rotary_rows():
    hq, hkv, d = 32, 8, 128
    pos_max = 32768
    freqs = torch.arange(pos_max, device="cuda")[:, None] * (
        10000.0 ** (-torch.arange(0, d, 2, device="cuda") / d)
    )
    cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)  # [pos_max, d] float32
    sets = [
        (_rand(T, hq, d), _rand(T, hkv, d), torch.randint(0, pos_max, (T,), device="cuda"))
        for _ in range(2)
    ]

    def eager(q, k, pos):
        cos, sin = cache[pos].chunk(2, dim=-1)
        cos, sin = torch.cat([cos, cos], -1)[:, None], torch.cat([sin, sin], -1)[:, None]
        for x in (q, k):
            x1, x2 = x.float().chunk(2, dim=-1)
            x.copy_(x.float() * cos + torch.cat([-x2, x1], -1) * sin)

    nbytes = 2 * T * (hq + hkv) * d * DTYPE.itemsize  # read and write q and k in place
    return [
        (
            "rotary",
            "kestrel",
            bench_rotating(lambda q, k, p: apply_rotary(q, k, p, cache), sets),
            nbytes,
        ),
        ("rotary", "torch eager", bench_rotating(eager, sets), nbytes),
    ]


def silu_rows():
    inter = 14336
    sets = [(_rand(T, 2 * inter),) for _ in range(2)]

    def eager(x):
        g, u = x.chunk(2, dim=-1)
        return F.silu(g) * u

    nbytes = 3 * T * inter * DTYPE.itemsize
    return [
        ("silu_and_mul", "kestrel", bench_rotating(silu_and_mul, sets), nbytes),
        ("silu_and_mul", "torch eager", bench_rotating(eager, sets), nbytes),
    ]


def main() -> None:
    print(device_summary())
    copy_bw = copy_bandwidth_tbps()
    print(f"ceiling: copy {copy_bw:.2f} TB/s (read+write); {T} tokens, bf16")
    rows = []
    for fn in (kv_store_rows, rms_norm_rows, rotary_rows, silu_rows):
        for kernel, impl, ms, nbytes in fn():
            rate = nbytes / ms / 1e9
            rows.append((kernel, impl, ms * 1e3, rate, rate / copy_bw))
    print_table(["kernel", "impl", "us", "TB/s", "of copy bw"], rows)


if __name__ == "__main__":
    main()
