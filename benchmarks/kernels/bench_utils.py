"""Shared helpers for the kernel benchmarks: graph-replay timing and device ceilings.

Every number is a median of `triton.testing.do_bench` (CUDA events, L2 flushed before each
run) over CUDA-graph replays, so Python launch overhead stays out, as it does in the engine's
graphed decode steps. Ceilings are measured on the device, not read off a datasheet.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton
import triton.testing


def bench_rotating(fn: Callable[..., Any], arg_sets: Sequence[tuple], rep_ms: int = 200) -> float:
    """Median milliseconds of one fn(*args), launch overhead excluded where possible.

    One CUDA graph calls fn once per arg set; do_bench flushes L2 before each replay, so every
    call reads cold inputs, and the median replay time is divided by the number of sets. If fn
    cannot be captured, falls back to timing eager calls that cycle through arg_sets.
    """
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (compile, allocate) outside the capture
            for args in arg_sets:
                fn(*args)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for args in arg_sets:
                fn(*args)
        ms = triton.testing.do_bench(graph.replay, warmup=50, rep=rep_ms, return_mode="median")
        return ms / len(arg_sets)
    except RuntimeError:
        torch.cuda.synchronize()
        it = itertools.cycle(arg_sets)
        return triton.testing.do_bench(
            lambda: fn(*next(it)), warmup=50, rep=rep_ms, return_mode="median"
        )


def copy_bandwidth_tbps(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy rate, counting bytes read plus bytes written."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * nbytes / ms / 1e9


def matmul_tflops(n: int = 8192) -> float:
    """bf16 n x n x n matrix product rate through torch (cuBLAS), on random data."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=100, rep=300, return_mode="median")
    return 2 * n**3 / ms / 1e9


def device_summary() -> str:
    props = torch.cuda.get_device_properties(0)
    return (
        f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, "
        f"triton {triton.__version__}"
    )


def print_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(c) for c in header]] + [
        [f"{c:.3f}" if isinstance(c, float) else str(c) for c in row] for row in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for j, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=False)))
        if j == 0:
            print("  ".join("-" * w for w in widths))
