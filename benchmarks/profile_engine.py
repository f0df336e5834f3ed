"""Where a decode-heavy run spends its time: host time per engine phase and GPU busy time.

Usage: python benchmarks/profile_engine.py [--workload nano-vllm|batch1|long] [--requests N]
           [--shape qwen3-0.6b] [--max-tokens N] [--temperature T] [--real-lengths]
           [--max-num-batched-tokens N] [--max-num-seqs N] [--plain-runs N]
           [--warmup-requests N]

Host phases are timed by wrapping the engine's methods (cheaper and less distorting than
cProfile); the GPU side is the sum of kernel times from torch.profiler over the same workload.
"""

from __future__ import annotations

import argparse
import collections
import functools
import gc
import statistics
import time

import torch

from kestrel import LLM, SamplingParams
from kestrel.bench.throughput import jit_compiles, make_workload, save_random_weights_cached
from kestrel.engine.engine import Engine
from kestrel.runner import sampler, sampling_plan
from kestrel.runner.cuda_graphs import CUDAGraphRunner
from kestrel.runner.input_batch import InputBatch
from kestrel.runner.model_runner import ModelRunner
from kestrel.scheduler.scheduler import Scheduler

PHASES = [(Scheduler, "schedule"), (Scheduler, "advance"), (Scheduler, "apply_output"),
          (InputBatch, "prepare"), (InputBatch, "update"), (ModelRunner, "launch"),
          (ModelRunner, "_sample"), (ModelRunner, "_fill_placeholders"), (ModelRunner, "finish"),
          (ModelRunner, "_prompt_logprobs"), (CUDAGraphRunner, "run"), (Engine, "_process"),
          (Engine, "step"), (sampling_plan, "SamplingPlan"), (sampler, "_to_device"),
          (sampler, "_sample_fused"), (sampler, "_sample_torch"),
          (torch.cuda.CUDAGraph, "replay")]


def instrument(totals: collections.Counter, calls: collections.Counter) -> None:
    for cls, name in PHASES:
        fn = getattr(cls, name)

        @functools.wraps(fn)
        def timed(*args, _fn=fn, _name=name, **kwargs):
            t0 = time.perf_counter()
            try:
                return _fn(*args, **kwargs)
            finally:
                totals[_name] += time.perf_counter() - t0
                calls[_name] += 1

        setattr(cls, name, timed)


def trace_steps() -> tuple[list, collections.Counter]:
    """Per engine step: (host seconds, scheduled tokens, requests, finished, GC seconds); and
    GC seconds per generation. A step that stalls the GPU shows up here with its cause."""
    steps: list[tuple[float, int, int, int, float]] = []
    gc_time: collections.Counter = collections.Counter()
    state = {"out": None, "gc0": 0.0, "in_step": 0.0}

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            state["gc0"] = time.perf_counter()
        else:
            dt = time.perf_counter() - state["gc0"]
            gc_time[info["generation"]] += dt
            state["in_step"] += dt

    gc.callbacks.append(on_gc)
    schedule, step = Scheduler.schedule, Engine.step

    def traced_schedule(self, *args, **kwargs):
        state["out"] = schedule(self, *args, **kwargs)
        return state["out"]

    def traced_step(self):
        t0, state["in_step"] = time.perf_counter(), 0.0
        result = step(self)
        out = state["out"]
        steps.append((time.perf_counter() - t0, out.total_num_scheduled_tokens,
                      len(out.num_scheduled_tokens), len(out.finished_req_ids),
                      state["in_step"]))
        return result

    Scheduler.schedule, Engine.step = traced_schedule, traced_step
    return steps, gc_time


def report_steps(steps: list, gc_time: collections.Counter) -> None:
    print(f"GC: {dict((g, round(t * 1e3, 1)) for g, t in sorted(gc_time.items()))} ms by "
          f"generation")
    decode = [s[0] for s in steps if s[1] == s[2]]
    mixed = [s[0] for s in steps if s[1] != s[2]]
    for name, xs in (("decode-only", decode), ("with prefill", mixed)):
        if xs:
            mean = statistics.mean(xs) * 1e3
            print(f"  {name} steps: {len(xs)}, host {sum(xs):.2f} s, mean {mean:.2f} ms, "
                  f"max {max(xs) * 1e3:.2f} ms")
    print("  slowest steps (ms, tokens, requests, finished, GC ms):")
    for s in sorted(steps, reverse=True)[:12]:
        print(f"    {s[0] * 1e3:7.2f} {s[1]:6d} {s[2]:4d} {s[3]:4d} {s[4] * 1e3:6.2f}")


def report_compiles(label: str, events: list) -> None:
    if events:
        names = collections.Counter(name for name, _ in events)
        print(f"  {label}: {len(events)} Triton compiles, {sum(t for _, t in events):.2f} s: "
              f"{dict(names)}")
    events.clear()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", default="nano-vllm")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--shape", default="qwen3-0.6b")
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--plain-runs", type=int, default=2)
    ap.add_argument("--warmup-requests", type=int, default=0,
                    help="requests in the warm-up run (default: the whole workload)")
    ap.add_argument("--real-lengths", action="store_true",
                    help="each request's max_tokens from the workload instead of --max-tokens")
    args = ap.parse_args()
    print(f"# python benchmarks/profile_engine.py {vars(args)}")
    path = save_random_weights_cached("/tmp/kestrel-random-weights", args.shape)
    compiles = jit_compiles().__enter__()  # stays installed for the whole script
    # Every run repeats the same prompts: without this, runs after the first would hit the
    # prefix cache and skip prefill, which `kestrel bench throughput`'s timed run does not.
    llm = LLM(path, max_model_len=4096, max_num_batched_tokens=args.max_num_batched_tokens,
              max_num_seqs=args.max_num_seqs, enable_prefix_caching=False)
    report_compiles("start-up", compiles)
    wl = make_workload(args.workload, args.requests)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens,
                            ignore_eos=True)
    if args.real_lengths:
        params = [params.clone(max_tokens=n) for n in wl.max_tokens]
        args.max_tokens = sum(wl.max_tokens) // len(wl.max_tokens)
    k = args.warmup_requests or len(wl.prompts)
    llm.generate(wl.prompts[:k], params[:k] if isinstance(params, list) else params,
                 use_tqdm=False)  # warm-up
    report_compiles("warm-up run", compiles)
    for _ in range(args.plain_runs):  # the run-to-run spread, with nothing attached
        t0 = time.perf_counter()
        llm.generate(wl.prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        print(f"plain run: {wall:.2f} s, {len(wl.prompts) * args.max_tokens / wall:,.0f} tok/s")
        report_compiles("plain run", compiles)
    steps, gc_time = trace_steps()
    t0 = time.perf_counter()
    llm.generate(wl.prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    print(f"traced run: {time.perf_counter() - t0:.2f} s")
    report_steps(steps, gc_time)
    totals: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    instrument(totals, calls)
    t0 = time.perf_counter()
    llm.generate(wl.prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    print(f"wall {wall:.2f} s, {len(wl.prompts) * args.max_tokens / wall:,.0f} output tok/s, "
          f"~{args.max_tokens} steps")
    for name, secs in totals.most_common():
        print(f"  {name:18s} {secs * 1e3 / args.max_tokens:7.3f} ms/step  {secs / wall:6.1%}"
              f"  {calls[name]:6d} calls")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as p:
        t0 = time.perf_counter()
        llm.generate(wl.prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    busy = sum(e.self_device_time_total for e in p.key_averages()) / 1e6
    print(f"GPU kernels {busy:.2f} s of {wall:.2f} s wall ({busy / wall:.0%} busy)")
    print(p.key_averages().table(sort_by="self_cuda_time_total", row_limit=24))
    print_gaps(p)


def print_gaps(prof: torch.profiler.profile, min_us: float = 20.0) -> None:
    """GPU idle gaps longer than min_us, grouped by the kernels on either side: a gap after
    the sampler and before a layer's first kernel is the host preparing the next step."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name[:40])
                   for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    by_pair: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    end, prev = spans[0][1], spans[0][2]
    for start, stop, name in spans[1:]:
        if start - end > min_us:
            by_pair[(prev, name)] += start - end
            count[(prev, name)] += 1
        if stop > end:
            end, prev = stop, name
    total = sum(by_pair.values())
    print(f"GPU gaps > {min_us:.0f} us: {total / 1e3:.0f} ms in {sum(count.values())} gaps")
    for (a, b), us in by_pair.most_common(8):
        print(f"  {us / 1e3:8.1f} ms {count[(a, b)]:5d}x  {a} -> {b}")


if __name__ == "__main__":
    main()
