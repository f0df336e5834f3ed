"""Fused q/k norm + RoPE + K/V store vs the unfused kernels, at real head layouts (GPU only).

    python benchmarks/kernels/bench_rope_store.py

Unfused is what an attention layer launches after its qkv projection without the fusion:
Qwen3-0.6B (16 q / 8 kv heads, d 128, q/k norm): q_norm, k_norm (each behind the copy that
reshaping a strided view makes), rotary, store_kv; Llama-3-8B (32 q / 8 kv heads, d 128): rotary,
store_kv. Fused is one rope_store_kv launch. Times are medians over CUDA-graph replays
(bench_utils.bench_rotating), so launch overhead counts as it does in graphed decode steps.
"""

from __future__ import annotations

import time

import torch
from bench_utils import bench_rotating, device_summary, print_table

from kestrel.kernels.kv_store import store_kv
from kestrel.kernels.norm import rms_norm
from kestrel.kernels.rope_store import rope_store_kv
from kestrel.kernels.rotary import apply_rotary

DTYPE = torch.bfloat16
LAYOUTS = {"qwen3-0.6b": (16, 8, 128, True), "llama3-8b": (32, 8, 128, False)}  # hq, hkv, d, norm
TOKENS = (1, 64, 256, 2048, 16384)
MAX_POS, PAGE, EPS = 32768, 16, 1e-6


def time_layout(hq: int, hkv: int, d: int, norm: bool, t: int) -> tuple[float, float, float]:
    """(unfused us, fused us with one token per program, fused us) for one step of t tokens."""
    inv_freq = 10000.0 ** (-torch.arange(0, d, 2, device="cuda") / d)
    freqs = torch.arange(MAX_POS, device="cuda")[:, None] * inv_freq[None, :]
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1)  # [MAX_POS, d] float32
    q_w = torch.randn(d, device="cuda", dtype=DTYPE) if norm else None
    k_w = torch.randn(d, device="cuda", dtype=DTYPE) if norm else None
    pages = 4 * max(t, 64) // PAGE
    cache = torch.randn(2, pages, PAGE, hkv, d, device="cuda", dtype=DTYPE)
    sets = [
        (
            torch.randn(t, (hq + 2 * hkv) * d, device="cuda", dtype=DTYPE),
            torch.randint(0, MAX_POS, (t,), device="cuda"),
            torch.randperm(pages * PAGE, device="cuda")[:t],
        )
        for _ in range(2)
    ]

    def unfused(qkv, pos, slots):
        q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
        q, k, v = q.view(t, hq, d), k.view(t, hkv, d), v.view(t, hkv, d)
        if norm:  # as layers/norm.py runs a per-head norm
            q = rms_norm(q.reshape(-1, d), q_w, EPS).view(q.shape)
            k = rms_norm(k.reshape(-1, d), k_w, EPS).view(k.shape)
        apply_rotary(q, k, pos, cos_sin)
        store_kv(k, v, cache, slots)

    def fused(qkv, pos, slots, per=None):
        rope_store_kv(qkv, pos, cos_sin, cache, slots, hq, hkv, d, q_w, k_w, EPS,
                      tokens_per_prog=per)

    one = [(*args, 1) for args in sets]
    return tuple(bench_rotating(fn, a) * 1e3 for fn, a in
                 ((unfused, sets), (fused, one), (fused, sets)))


def rows():
    out = []
    for name, (hq, hkv, d, norm) in LAYOUTS.items():
        for t in TOKENS:
            unfused_us, one_us, fused_us = time_layout(hq, hkv, d, norm, t)
            out.append((name, t, unfused_us, one_us, fused_us, unfused_us / fused_us))
    return out


def main() -> None:
    print(f"# {device_summary()}, {time.strftime('%Y-%m-%d')}, bf16")
    print_table(["layout", "tokens", "unfused us", "fused us (1 token/program)", "fused us",
                 "speedup"], rows())


if __name__ == "__main__":
    main()
