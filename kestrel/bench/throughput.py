"""`kestrel bench throughput`: offline generation throughput next to its roofline and HF.

Owns the reproducible workloads, the memory-roofline arithmetic and the report. Prints the
command, device and date with every result; writes JSON. A benchmark, never a test.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

WORKLOADS = ("nano-vllm", "batch1", "long")


@dataclass
class Workload:
    name: str
    prompts: list[list[int]]
    max_tokens: list[int]
    temperature: float

    @property
    def prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))

    @property
    def output_tokens(self) -> int:
        return sum(self.max_tokens)


def make_workload(name: str, num_requests: int | None = None,
                  vocab_size: int | None = None) -> Workload:
    """The published workloads; `num_requests` keeps only the first requests (same draws).
    Token ids are folded into a vocabulary smaller than the draws' range [0, 10000]."""
    rng = random.Random(0)
    if name == "nano-vllm":
        # NOTE: all prompts are drawn first, then all lengths: 142,827 / 133,966 tokens.
        prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(100, 1024))]
                   for _ in range(256)]
        max_tokens = [rng.randint(100, 1024) for _ in range(256)]
        wl = Workload(name, prompts, max_tokens, 0.6)
    elif name == "batch1":
        wl = Workload(name, [[rng.randint(0, 10000) for _ in range(128)]], [512], 0.0)
    elif name == "long":
        prompts = [[rng.randint(0, 10000) for _ in range(1024)] for _ in range(1000)]
        wl = Workload(name, prompts, [1024] * 1000, 0.0)
    else:
        raise ValueError(f"unknown workload {name!r}; supported: {list(WORKLOADS)}")
    if num_requests is not None:
        wl = Workload(wl.name, wl.prompts[:num_requests], wl.max_tokens[:num_requests],
                      wl.temperature)
    if vocab_size is not None and vocab_size <= 10000:
        wl.prompts = [[t % vocab_size for t in p] for p in wl.prompts]
    return wl


def measure_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    numel = (1 << 30 if device.type == "cuda" else 1 << 27) // 4
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    _sync(device)
    reps = 20 if device.type == "cuda" else 5
    t0 = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    _sync(device)
    return 2 * src.numel() * 4 * reps / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul in `dtype`: the compute ceiling prefill runs against."""
    n = 8192 if device.type == "cuda" else 512
    dtype = dtype if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    reps = 20 if device.type == "cuda" else 3
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def roofline(wl: Workload, hf_config: Any, dtype_bytes: int, max_num_seqs: int,
             bandwidth: float, kv_capacity_tokens: int | None = None,
             matmul_flops: float | None = None) -> dict[str, float]:
    """Lower bound on time from the bytes decode must move: all weights once per step, plus
    every request's KV once per generated token. Steps come from a simulation of continuous
    batching with `max_num_seqs` seats, and, given the KV cache's size, only as many running
    requests as it holds at their full length.

    With `matmul_flops`, also the serial bound: the memory bound plus prefill's GEMM FLOPs at
    that rate, i.e. the time when prefill does not overlap decode."""
    c = hf_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * dtype_bytes
    h, inter, v, layers = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_hidden_layers
    q, kv = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * inter
    weight_bytes = (layers * per_layer + v * h) * dtype_bytes  # lm_head read every step
    kv_bytes = sum(
        kv_per_token * (n * len(p) + n * (n - 1) / 2) for p, n in zip(wl.prompts, wl.max_tokens)
    )
    sizes = [len(p) + n for p, n in zip(wl.prompts, wl.max_tokens)]
    steps = _decode_steps(wl.max_tokens, max_num_seqs, sizes, kv_capacity_tokens)
    seconds = (steps * weight_bytes + kv_bytes) / bandwidth
    out = {"decode_steps": steps, "weight_bytes": weight_bytes, "kv_read_bytes": kv_bytes,
           "roofline_s": seconds, "roofline_tok_s": wl.output_tokens / seconds}
    if matmul_flops:
        prefill_s = 2 * layers * per_layer * wl.prompt_tokens / matmul_flops
        out.update(prefill_compute_s=prefill_s, matmul_tflops=matmul_flops / 1e12,
                   serial_roofline_tok_s=wl.output_tokens / (seconds + prefill_s))
    return out


def _decode_steps(lengths: list[int], seats: int, sizes: list[int] | None = None,
                  capacity: int | None = None) -> int:
    """Steps of a continuous batch that admits requests in order as seats free up; with
    `capacity`, a request also waits until its `sizes` KV tokens fit next to the running
    ones (a request larger than the whole cache runs alone)."""
    import heapq

    ends: list[tuple[int, int]] = []  # (end step, KV tokens) of running requests
    step = used = 0
    for i, n in enumerate(lengths):
        need = sizes[i] if sizes is not None and capacity else 0
        while ends and (len(ends) == seats or (capacity and used + need > capacity)):
            step, freed = heapq.heappop(ends)
            used -= freed
        heapq.heappush(ends, (step + n, need))
        used += need
    return max(end for end, _ in ends) if ends else 0


def run_kestrel(path: str, wl: Workload, engine_opts: dict[str, Any]) -> dict[str, float]:
    from kestrel import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(path, **engine_opts)
    startup = time.perf_counter() - t0
    params = [SamplingParams(temperature=wl.temperature, max_tokens=n, ignore_eos=True)
              for n in wl.max_tokens]
    llm.generate([wl.prompts[0]], SamplingParams(max_tokens=8, ignore_eos=True),
                 use_tqdm=False)  # the one warm-up request
    _sync(llm.engine.executor.runner.device)
    with jit_compiles() as compiles:
        t0 = time.perf_counter()
        outs = llm.generate(wl.prompts, params, use_tqdm=True)
        elapsed = time.perf_counter() - t0
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    assert produced == wl.output_tokens, (produced, wl.output_tokens)
    timings = dict(llm.engine.executor.runner.timings)
    return {"startup_s": startup, "startup_breakdown": timings, "seconds": elapsed,
            "output_tok_s": produced / elapsed,
            "total_tok_s": (produced + wl.prompt_tokens) / elapsed,
            "ms_per_token_batch1": 1000 * elapsed / produced if len(wl.prompts) == 1 else 0.0,
            "preemptions": llm.engine.scheduler.num_preemptions,
            "kv_capacity_tokens": llm.engine.kv.num_blocks * llm.engine.kv.block_size,
            "jit_compiles_in_run": len(compiles),
            "jit_compile_s": sum(t for _, t in compiles),
            "jit_compiled_kernels": sorted({name for name, _ in compiles})}


@contextlib.contextmanager
def jit_compiles() -> Iterator[list[tuple[str, float]]]:
    """(kernel, seconds) of each Triton JIT compile (in-memory cache miss) inside the block:
    a kernel variant first met mid-run stalls the engine, and the figure says how much."""
    seconds: list[tuple[str, float]] = []
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        yield seconds
        return
    original = JITFunction._do_compile

    def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            seconds.append((self.fn.__name__, time.perf_counter() - t0))

    JITFunction._do_compile = timed
    try:
        yield seconds
    finally:
        JITFunction._do_compile = original


def run_hf(path: str, wl: Workload, device: torch.device, dtype: torch.dtype,
           batch_size: int) -> dict[str, float]:
    """HF transformers generate in static, left-padded batches; counts only the tokens each
    request asked for (a static batch runs to its longest request)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    t0 = time.perf_counter()
    for i in range(0, len(wl.prompts), batch_size):
        chunk = wl.prompts[i : i + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk],
                            device=device)
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, do_sample=wl.temperature > 0,
                           temperature=wl.temperature or None, top_p=None, top_k=None,
                           max_new_tokens=max(wl.max_tokens[i : i + batch_size]),
                           min_new_tokens=max(wl.max_tokens[i : i + batch_size]),
                           eos_token_id=None, pad_token_id=0)
    _sync(device)
    elapsed = time.perf_counter() - t0
    return {"seconds": elapsed, "output_tok_s": wl.output_tokens / elapsed}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="HF model folder (or use --random-weights)")
    parser.add_argument("--random-weights", choices=["qwen3-0.6b", "llama3-8b", "qwen3-8b"],
                        help="build a real-shape random-weight folder (cached in --cache-dir)")
    parser.add_argument("--cache-dir", default="/tmp/kestrel-random-weights")
    parser.add_argument("--workload", choices=WORKLOADS, default="nano-vllm")
    parser.add_argument("--num-requests", type=int, help="first N requests of the workload")
    parser.add_argument("--hf-requests", type=int, default=0,
                        help="also run HF transformers on the first N requests (0 = skip)")
    parser.add_argument("--hf-batch-size", type=int, default=64)
    parser.add_argument("--json", help="write results here")


def run(args: argparse.Namespace, engine_opts: dict[str, Any]) -> int:
    import os

    from kestrel.models.loader import load_hf_config

    if args.random_weights:
        path = save_random_weights_cached(args.cache_dir, args.random_weights)
    elif args.model:
        path = args.model
    else:
        from kestrel.assets import default_model_path

        path = default_model_path()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hf_config = load_hf_config(path)
    wl = make_workload(args.workload, args.num_requests, hf_config.vocab_size)
    dtype_name = engine_opts.get("dtype", "auto")
    if dtype_name == "auto":
        dtype_name = "bfloat16" if device.type == "cuda" else "float32"
        engine_opts["dtype"] = dtype_name
    dtype = getattr(torch, dtype_name)
    bw = measure_bandwidth(device)
    report: dict[str, Any] = {
        "command": " ".join(["kestrel"] + sys.argv[1:]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"CPU ({os.cpu_count()} cores)",
        "date": datetime.date.today().isoformat(),
        "workload": {"name": wl.name, "requests": len(wl.prompts),
                     "prompt_tokens": wl.prompt_tokens, "output_tokens": wl.output_tokens},
        "bandwidth_GBs": bw / 1e9,
    }
    print(f"# {report['command']}\n# device: {report['device']}  date: {report['date']}")
    print(f"# workload {wl.name}: {len(wl.prompts)} requests, {wl.prompt_tokens:,} prompt / "
          f"{wl.output_tokens:,} output tokens; copy bandwidth {bw / 1e9:.0f} GB/s")
    report["matmul_TFLOPs"] = (flops := measure_matmul(device, dtype)) / 1e12
    print(f"# matmul ({dtype_name}) {report['matmul_TFLOPs']:.0f} TFLOP/s")
    seats = engine_opts.get("max_num_seqs", 256)
    report["kestrel"] = run_kestrel(path, wl, engine_opts)
    report["roofline"] = roofline(wl, hf_config, dtype.itemsize, seats, bw,
                                  report["kestrel"]["kv_capacity_tokens"], flops)
    if args.hf_requests:
        sub = make_workload(args.workload, args.hf_requests, hf_config.vocab_size)
        report["hf"] = run_hf(path, sub, device, dtype, args.hf_batch_size)
        report["hf"]["requests"] = len(sub.prompts)
        report["hf"]["roofline_tok_s"] = roofline(sub, hf_config, dtype.itemsize, seats,
                                                  bw)["roofline_tok_s"]
    _print_table(report)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    return 0


def save_random_weights_cached(cache_dir: str, shape: str) -> str:
    import os

    from kestrel.bench.random_model import save_random_weights

    return save_random_weights(os.path.join(cache_dir, shape), shape)


def _print_table(r: dict[str, Any]) -> None:
    k, roof = r["kestrel"], r["roofline"]
    print(f"{'engine':<34}{'output tok/s':>14}{'of roofline':>13}{'seconds':>10}")
    print(f"{'memory roofline (decode bytes)':<34}{roof['roofline_tok_s']:>14,.0f}"
          f"{1.0:>13.2f}{roof['roofline_s']:>10.2f}")
    if "serial_roofline_tok_s" in roof:
        serial = roof["serial_roofline_tok_s"]
        print(f"{'  + prefill GEMMs, not overlapped':<34}{serial:>14,.0f}"
              f"{serial / roof['roofline_tok_s']:>13.2f}"
              f"{roof['roofline_s'] + roof['prefill_compute_s']:>10.2f}")
    print(f"{'kestrel':<34}{k['output_tok_s']:>14,.0f}"
          f"{k['output_tok_s'] / roof['roofline_tok_s']:>13.2f}{k['seconds']:>10.2f}")
    if k["ms_per_token_batch1"]:
        print(f"  batch-1 latency: {k['ms_per_token_batch1']:.2f} ms/token")
    if "hf" in r:
        hf = r["hf"]
        label = f"HF transformers ({hf['requests']} req subset)"
        print(f"{label:<34}{hf['output_tok_s']:>14,.0f}"
              f"{hf['output_tok_s'] / hf['roofline_tok_s']:>13.2f}{hf['seconds']:>10.2f}")
    parts = ", ".join(f"{n} {v:.2f}" for n, v in k["startup_breakdown"].items())
    print(f"  kestrel startup: {k['startup_s']:.1f} s ({parts})")
    print(f"  during the run: {k['preemptions']} preemptions, {k['jit_compiles_in_run']} Triton "
          f"compiles ({k['jit_compile_s']:.2f} s) {' '.join(k['jit_compiled_kernels'])}")
