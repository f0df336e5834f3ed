"""Batch-1 decode on a real-shape model: host profile and GPU busy time per token.

Usage: python benchmarks/profile_batch1.py [--shape llama3-8b] [--tokens 256] [--repeat N]

--repeat N: no profilers; N timed generations, median and minimum ms/token (A/B of changes
worth ~1%, which one 512-token run of `kestrel bench throughput` cannot resolve).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import torch

from kestrel import LLM, SamplingParams
from kestrel.bench.throughput import save_random_weights_cached


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=0)
    args = ap.parse_args()
    llm = LLM(save_random_weights_cached("/tmp/kestrel-random-weights", args.shape),
              max_model_len=4096)
    prompt = [[(i * 7919) % 10000 for i in range(128)]]
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    llm.generate(prompt, params, use_tqdm=False)
    if args.repeat:
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            llm.generate(prompt, params, use_tqdm=False)
            times.append(1000 * (time.perf_counter() - t0) / args.tokens)
        print(f"ms/token over {args.repeat} runs: median {statistics.median(times):.3f}, "
              f"min {min(times):.3f} ({', '.join(f'{t:.3f}' for t in times)})")
        return
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    llm.generate(prompt, params, use_tqdm=False)
    prof.disable()
    print(f"cProfile run: {1000 * (time.perf_counter() - t0) / args.tokens:.2f} ms/token")
    pstats.Stats(prof).sort_stats("tottime").print_stats(12)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as p:
        t0 = time.perf_counter()
        llm.generate(prompt, params, use_tqdm=False)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    busy = sum(e.self_device_time_total for e in p.key_averages()) / 1e6
    print(f"{1000 * wall / args.tokens:.2f} ms/token wall, GPU kernels {busy:.3f} s of "
          f"{wall:.3f} s ({busy / wall:.0%} busy)")
    print(p.key_averages().table(sort_by="self_cuda_time_total", row_limit=8))


if __name__ == "__main__":
    main()
