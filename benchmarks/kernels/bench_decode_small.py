"""Batch-1 GEMV and fused sampling vs their torch peers, at real shapes.

    python benchmarks/kernels/bench_decode_small.py [--sweep]

GEMV rows: Llama-3-8B / Qwen3-0.6B projections at one token (weight bytes over time, next to
the device copy bandwidth), cuBLAS through F.linear vs kestrel's Triton GEMV. `--sweep` times
every tile config, to choose the heuristic. Fused rows: the RMSNorm (+ residual) or SiLU-and-mul
kernel then the GEMV vs the one GEMV launch with that op folded into its x loads, at Llama-3-8B
shapes (TB/s counts the weight bytes only). Sampling rows: one step of temperature sampling at
batch 256 over the Qwen3 vocabulary, the torch sampler (upcast, scale, softmax, exponential
noise, argmax) vs the fused Gumbel-max kernel reading bf16 logits once.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F
from bench_utils import bench_rotating, copy_bandwidth_tbps, device_summary, print_table

from kestrel.kernels.activation import silu_and_mul
from kestrel.kernels.gemv import gemv, gemv_tiles
from kestrel.kernels.gemv_fused import gemv_rmsnorm, gemv_silu_mul
from kestrel.kernels.norm import rms_norm
from kestrel.kernels.sampling import gumbel_sample
from kestrel.runner.sampler import Sampler, SamplingBatch
from kestrel.sampling_params import SamplingParams

DTYPE = torch.bfloat16
SHAPES = {  # name: (n, k)
    "8b qkv": (6144, 4096), "8b o": (4096, 4096), "8b gate_up": (28672, 4096),
    "8b down": (4096, 14336), "8b lm_head": (128256, 4096),
    "0.6b qkv": (4096, 1024), "0.6b gate_up": (6144, 1024), "0.6b down": (1024, 3072),
}
SWEEP = [(bn, bk, w) for bn in (2, 4, 8, 16, 32) for bk in (128, 256, 512, 1024) for w in (4, 8)
         if bn * bk <= 16384]
EPS = 1e-5


def best_tiles(fn, sets, ms: float, n: int, k: int, sweep: bool) -> tuple[str, float]:
    """(tiles, ms) of the fastest fn(*args, tiles=t) over SWEEP; the heuristic's without sweep."""
    best = ("heuristic " + str(gemv_tiles(n, k)), ms)
    if sweep:
        for t in SWEEP:
            t_ms = bench_rotating(lambda *args, t=t: fn(*args, tiles=t), sets, rep_ms=60)
            if t_ms < best[1]:
                best = (str(t), t_ms)
    return best


def gemv_rows(sweep: bool):
    rows = []
    for name, (n, k) in SHAPES.items():
        sets = [(torch.randn(1, k, device="cuda", dtype=DTYPE),
                 torch.randn(n, k, device="cuda", dtype=DTYPE) / k**0.5) for _ in range(2)]
        nbytes = n * k * 2
        ref = F.linear(*sets[0]).float()
        err = ((gemv(*sets[0]).float() - ref).norm() / ref.norm()).item()
        assert err < 1e-2, (name, err)
        cub = bench_rotating(F.linear, sets)
        ours = bench_rotating(gemv, sets)
        best = best_tiles(gemv, sets, ours, n, k, sweep)
        rows.append((name, f"{n}x{k}", cub * 1e3, nbytes / cub / 1e9, ours * 1e3,
                     nbytes / ours / 1e9, best[0], nbytes / best[1] / 1e9))
        del sets
    return rows


def gemv_batch_rows():
    """Batch 2 and 4 (one weight read shared by the rows) vs cuBLAS."""
    rows = []
    for name in ("8b qkv", "8b gate_up", "8b down"):
        n, k = SHAPES[name]
        for m in (2, 4):
            sets = [(torch.randn(m, k, device="cuda", dtype=DTYPE),
                     torch.randn(n, k, device="cuda", dtype=DTYPE) / k**0.5) for _ in range(2)]
            cub, ours = bench_rotating(F.linear, sets), bench_rotating(gemv, sets)
            rows.append((name, m, cub * 1e3, ours * 1e3, n * k * 2 / ours / 1e9))
    return rows


def _unfused_rmsnorm(x, residual, g, w):
    if residual is None:
        return gemv(rms_norm(x, g, EPS), w), x
    normed, h = rms_norm(x, g, EPS, residual=residual)
    return gemv(normed, w), h


def _fused_rmsnorm(x, residual, g, w, tiles=None):
    return gemv_rmsnorm(x, g, EPS, w, residual=residual, tiles=tiles)


def _unfused_silu_mul(x, w):
    return gemv(silu_and_mul(x), w)


def fused_rows(sweep: bool):
    """Llama-3-8B qkv (norm with residual add), gate_up (norm), down (SiLU-and-mul) at batch 1:
    two launches vs one."""
    rows = []
    for name, prologue in (("8b qkv", "rmsnorm+res"), ("8b gate_up", "rmsnorm"),
                           ("8b down", "silu_mul")):
        n, k = SHAPES[name]
        w = [torch.randn(n, k, device="cuda", dtype=DTYPE) / k**0.5 for _ in range(2)]
        if prologue == "silu_mul":
            sets = [(torch.randn(1, 2 * k, device="cuda", dtype=DTYPE), wi) for wi in w]
            unfused, fused = _unfused_silu_mul, gemv_silu_mul
        else:
            sets = [(torch.randn(1, k, device="cuda", dtype=DTYPE),
                     torch.randn(1, k, device="cuda", dtype=DTYPE) if prologue.endswith("res")
                     else None, 1 + 0.1 * torch.randn(k, device="cuda", dtype=DTYPE), wi)
                    for wi in w]
            unfused, fused = _unfused_rmsnorm, _fused_rmsnorm
        ref, got = unfused(*sets[0]), fused(*sets[0])
        if prologue != "silu_mul":
            assert torch.equal(ref[1], got[1]), name
            ref, got = ref[0], got[0]
        err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
        assert err < 1e-2, (name, err)
        nbytes = n * k * 2
        two = bench_rotating(unfused, sets)
        one = bench_rotating(fused, sets)
        best = best_tiles(fused, sets, one, n, k, sweep)
        rows.append((name, prologue, f"{n}x{k}", two * 1e3, nbytes / two / 1e9, one * 1e3,
                     nbytes / one / 1e9, (two - one) * 1e3, best[0], nbytes / best[1] / 1e9))
        del sets, w
    return rows


def sampling_rows():
    rows_n, vocab = 256, 151936
    logits = [torch.randn(rows_n, vocab, device="cuda", dtype=DTYPE) for _ in range(2)]
    params = [SamplingParams(temperature=0.6)] * rows_n
    batch = SamplingBatch(params=params, prompt_token_ids=[[]] * rows_n,
                          output_token_ids=[[]] * rows_n, stop_token_ids=[[]] * rows_n,
                          generators=[None] * rows_n)
    sampler = Sampler()
    temps = torch.full((rows_n,), 0.6, device="cuda")
    seeds = torch.arange(rows_n, device="cuda")
    torch_ms = bench_rotating(lambda x: sampler(x, batch).sampled_token_ids, [(x,) for x in logits])
    fused_ms = bench_rotating(lambda x: gumbel_sample(x, temps, seeds), [(x,) for x in logits])
    nbytes = rows_n * vocab * 2
    return [("torch sampler", torch_ms * 1e3, nbytes / torch_ms / 1e9),
            ("fused gumbel", fused_ms * 1e3, nbytes / fused_ms / 1e9)]


def main() -> None:
    sweep = "--sweep" in sys.argv
    print(f"# {' '.join(sys.argv)}\n# {device_summary()}, {time.strftime('%Y-%m-%d')}")
    bw = copy_bandwidth_tbps()
    print(f"# copy bandwidth {bw:.2f} TB/s")
    print_table(["layer", "n x k", "cuBLAS us", "TB/s", "triton us", "TB/s", "best tiles",
                 "TB/s"], gemv_rows(sweep))
    print()
    print_table(["layer", "rows", "cuBLAS us", "triton us", "TB/s"], gemv_batch_rows())
    print()
    print_table(["layer", "prologue", "n x k", "unfused us", "TB/s", "fused us", "TB/s",
                 "saved us", "best fused tiles", "TB/s"], fused_rows(sweep))
    print()
    print_table(["sampling 256 x 151936", "us", "TB/s (bf16 logits read)"], sampling_rows())


if __name__ == "__main__":
    main()
