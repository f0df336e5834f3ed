"""Decode-batch GEMMs: cuBLAS (F.linear) vs kestrel's skinny Triton GEMM, at real shapes.

    python benchmarks/kernels/bench_gemm.py [--sweep]

Shape rows: each projection of Qwen3-0.6B and Llama-3-8B at decode batches of 2-256 rows,
one kernel per graph replay, L2 flushed (TB/s counts weight bytes; TFLOP/s the product).
Chain rows: the 4 projections of every layer of Qwen3-0.6B or Llama-3-8B in one CUDA graph,
as a decode step runs them, so the launch gaps between kernels count; under
programmatic dependent launch the Triton GEMM's programs are scheduled while the previous
one drains. `--sweep` times every tile config at 8, 16 and 32 rows to choose the heuristic.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F
import triton.testing
from bench_utils import bench_rotating, copy_bandwidth_tbps, device_summary, print_table

from kestrel.kernels.gemm import GemmConfig, gemm, gemm_config

DTYPE = torch.bfloat16
SHAPES = {  # name: (n, k)
    "0.6b qkv": (4096, 1024), "0.6b o": (1024, 2048), "0.6b gate_up": (6144, 1024),
    "0.6b down": (1024, 3072), "0.6b lm_head": (151936, 1024),
    "8b qkv": (6144, 4096), "8b o": (4096, 4096), "8b gate_up": (28672, 4096),
    "8b down": (4096, 14336),
}
ROWS = (2, 4, 8, 16, 32, 64, 128, 256)
LAYERS = {"0.6b": (28, ("0.6b qkv", "0.6b o", "0.6b gate_up", "0.6b down")),
          "8b": (32, ("8b qkv", "8b o", "8b gate_up", "8b down"))}
SWEEP_ROWS = (8, 16, 32)


def sweep_configs(m: int, n: int, k: int):
    bm0 = max(16, min(128, 1 << (m - 1).bit_length()))
    for bm in sorted({bm0, max(16, bm0 // 2)}):
        for bn in (64, 128):
            for bk in (64, 128):
                for split in (1, 2, 4):
                    if k // split < 2 * bk:
                        continue
                    stages = 4 if (bm + bn) * bk * 2 * 4 <= 160 * 1024 else 3
                    yield GemmConfig(bm, bn, bk, split, 4, stages)


def shape_rows(sweep: bool):
    rows = []
    for name, (n, k) in SHAPES.items():
        ws = [torch.randn(n, k, device="cuda", dtype=DTYPE) / k**0.5 for _ in range(2)]
        for m in ROWS:
            sets = [(torch.randn(m, k, device="cuda", dtype=DTYPE), w) for w in ws]
            ref = F.linear(*sets[0]).float()
            err = ((gemm(*sets[0]).float() - ref).norm() / ref.norm()).item()
            assert err < 1e-2, (name, m, err)
            cub = bench_rotating(F.linear, sets)
            ours = bench_rotating(gemm, sets)
            best = (str(tuple(gemm_config(m, n, k, ws[0].device))), ours)
            if sweep and m in SWEEP_ROWS and "lm_head" not in name:
                for cfg in sweep_configs(m, n, k):
                    try:
                        t = bench_rotating(lambda x, w, cfg=cfg: gemm(x, w, config=cfg), sets,
                                           rep_ms=40)
                    except Exception:  # out of shared memory for this tile
                        continue
                    if t < best[1]:
                        best = (str(tuple(cfg)), t)
            flops = 2 * m * n * k
            rows.append((name, m, cub * 1e3, n * k * 2 / cub / 1e9, ours * 1e3,
                         n * k * 2 / ours / 1e9, flops / ours / 1e9, cub / ours, best[0],
                         best[1] * 1e3))
            del sets
        del ws
    return rows


def chain_rows(model: str):
    """Every layer's (qkv, o, gate_up, down) in one graph, cuBLAS vs Triton."""
    rows = []
    num_layers, layer = LAYERS[model]
    layers = [[torch.randn(*SHAPES[s], device="cuda", dtype=DTYPE) / SHAPES[s][1] ** 0.5
               for s in layer] for _ in range(num_layers)]
    for m in (2, 4, 8, 16, 32, 64, 128, 256):
        xs = [torch.randn(m, SHAPES[s][1], device="cuda", dtype=DTYPE) for s in layer]

        def step(fn, xs=xs):
            for ws in layers:
                for x, w in zip(xs, ws, strict=True):
                    fn(x, w)

        times = []
        for fn in (F.linear, gemm):
            step(fn)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step(fn)
            times.append(triton.testing.do_bench(graph.replay, warmup=20, rep=200,
                                                 return_mode="median"))
            del graph
        nbytes = sum(n * k * 2 for n, k in (SHAPES[s] for s in layer)) * num_layers
        rows.append((model, m, times[0] * 1e3, nbytes / times[0] / 1e9, times[1] * 1e3,
                     nbytes / times[1] / 1e9, times[0] / times[1]))
    return rows


def main() -> None:
    sweep = "--sweep" in sys.argv
    print(f"# {' '.join(sys.argv)}\n# {device_summary()}, {time.strftime('%Y-%m-%d')}")
    print(f"# copy bandwidth {copy_bandwidth_tbps():.2f} TB/s")
    print_table(["layer", "rows", "cuBLAS us", "TB/s", "triton us", "TB/s", "TFLOP/s",
                 "speedup", "best config", "best us"], shape_rows(sweep))
    print()
    print_table(["model", "rows", "cuBLAS chain us", "TB/s", "triton chain us", "TB/s",
                 "speedup"], chain_rows("0.6b") + chain_rows("8b"))


if __name__ == "__main__":
    main()
