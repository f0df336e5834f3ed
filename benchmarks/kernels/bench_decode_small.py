"""Batch-1 GEMV and fused sampling vs their torch peers, at real shapes.

    python benchmarks/kernels/bench_decode_small.py [--sweep]

GEMV rows: Llama-3-8B / Qwen3-0.6B projections at one token (weight bytes over time, next to
the device copy bandwidth), cuBLAS through F.linear vs kestrel's Triton GEMV. `--sweep` times
every tile config, to choose the heuristic. Sampling rows: one step of temperature sampling at
batch 256 over the Qwen3 vocabulary, the torch sampler (upcast, scale, softmax, exponential
noise, argmax) vs the fused Gumbel-max kernel reading bf16 logits once.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F
from bench_utils import bench_rotating, copy_bandwidth_tbps, device_summary, print_table

from kestrel.kernels.gemv import _tiles, gemv
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
        best = ("heuristic " + str(_tiles(n, k)), ours)
        if sweep:
            for t in SWEEP:
                ms = bench_rotating(lambda x, w, t=t: gemv(x, w, tiles=t), sets, rep_ms=60)
                if ms < best[1]:
                    best = (str(t), ms)
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
    print_table(["sampling 256 x 151936", "us", "TB/s (bf16 logits read)"], sampling_rows())


if __name__ == "__main__":
    main()
