"""Where a decode-heavy run spends its time: host profile (cProfile) and GPU busy time.

Usage: python benchmarks/profile_engine.py [--requests N] [--shape qwen3-0.6b]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from kestrel import LLM, SamplingParams
from kestrel.bench.throughput import make_workload, save_random_weights_cached


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--shape", default="qwen3-0.6b")
    ap.add_argument("--max-tokens", type=int, default=200)
    args = ap.parse_args()
    path = save_random_weights_cached("/tmp/kestrel-random-weights", args.shape)
    llm = LLM(path, max_model_len=4096, max_num_batched_tokens=16384)
    wl = make_workload("nano-vllm", args.requests)
    params = SamplingParams(temperature=0.6, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate(wl.prompts, params, use_tqdm=False)  # warm-up
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    llm.generate(wl.prompts, params, use_tqdm=False)
    prof.disable()
    wall = time.perf_counter() - t0
    print(f"wall {wall:.2f} s, {args.requests * args.max_tokens / wall:,.0f} output tok/s")
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    # GPU busy time over the same run (kernel time summed; gaps = wall - busy).
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as p:
        t0 = time.perf_counter()
        llm.generate(wl.prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    busy = sum(e.self_device_time_total for e in p.key_averages()) / 1e6
    print(f"GPU kernels {busy:.2f} s of {wall:.2f} s wall ({busy / wall:.0%} busy)")
    print(p.key_averages().table(sort_by="self_cuda_time_total", row_limit=15))


if __name__ == "__main__":
    main()
