"""Replay a throughput workload through the scheduler alone, on the CPU (no model, no GPU).

    python benchmarks/sim_schedule.py [--workload long] [--kv-tokens 437968]

The real `Scheduler` and `KVCacheManager` run every step of the workload with a runner that
returns one token per finished row and never an EOS (the workloads ignore EOS). This counts what
the scheduling policy alone decides: steps, preemptions, prompt tokens recomputed after them
and how wide decode runs. Workload 3 ("long") on the Llama-3-8B shape gets 437,968 KV tokens on
one H100 80GB (the engine's own sizing at gpu_memory_utilization 0.9); pass the count printed
by `kestrel bench throughput` for another card.

`--cost` adds a modelled time (a model, not a measurement) for the Llama-3-8B shape on one H100
80GB: per step the GEMMs take the weight read and the FLOPs at the measured rates combined as
sqrt(a^2 + b^2) (cuBLAS near the ridge reaches neither alone), decode attention reads each
context's KV at the decode kernel's measured rate, prefill attention runs at 400 TFLOP/s and
the norm / activation kernels move ~4.8 MB per token. On the first 400 requests of workload 3
the old admission rule models at 57.7 s against the 59.4 s a GPU profile measured
(BENCHMARKS.md, "Where the time goes"), attention 30.0 s against 27.9.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

from kestrel.bench.throughput import WORKLOADS, make_workload
from kestrel.config import SchedulerConfig
from kestrel.kv.kv_manager import KVCacheManager
from kestrel.outputs import ModelOutput
from kestrel.request import Request
from kestrel.sampling_params import SamplingParams
from kestrel.scheduler.scheduler import Scheduler


@dataclass(frozen=True)
class CostH100Llama8B:
    weight_bytes: float = 13.96e9 + 1.05e9  # layers + LM head, bf16
    flops_per_token: float = 2 * 6.98e9
    kv_bytes_per_token: float = 32 * 2 * 8 * 128 * 2  # layers x (K, V) x heads x dim x bf16
    gemm_bandwidth: float = 2.9e12
    matmul_rate: float = 6.2e14
    attention_bandwidth: float = 2.75e12
    prefill_attention_rate: float = 4.0e14
    small_bytes_per_token: float = 4.8e6
    step_overhead: float = 1e-4

    def step(self, tokens: int, kv_read: int, prefill_attn_flops: float) -> dict[str, float]:
        mem, flops = self.weight_bytes / self.gemm_bandwidth, tokens * (
            self.flops_per_token / self.matmul_rate)
        return {"gemm": math.hypot(mem, flops),
                "decode attention": kv_read * self.kv_bytes_per_token / self.attention_bandwidth,
                "prefill attention": prefill_attn_flops / self.prefill_attention_rate,
                "other": tokens * self.small_bytes_per_token / self.gemm_bandwidth
                + self.step_overhead}


def _one_token_each(sched: Scheduler, out) -> ModelOutput:
    result = ModelOutput()
    for rid in out.batch_req_ids():
        req = sched.requests[rid]
        done = req.num_computed_tokens + out.num_scheduled_tokens[rid] == req.num_tokens
        result.req_ids.append(rid)
        result.sampled_token_ids.append([7] if done else [])
        result.logprobs.append(None)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", choices=WORKLOADS, default="long")
    ap.add_argument("--kv-tokens", type=int, default=437_968)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--max-num-seqs", type=int, default=512)
    ap.add_argument("--new-token-ratio", type=float, default=SchedulerConfig.new_token_ratio)
    ap.add_argument("--num-requests", type=int, default=None)
    ap.add_argument("--cost", action="store_true", help="modelled time, Llama-3-8B on H100")
    args = ap.parse_args()
    print(f"# sim_schedule.py --workload {args.workload} --kv-tokens {args.kv_tokens} "
          f"--max-num-batched-tokens {args.max_num_batched_tokens} --max-num-seqs "
          f"{args.max_num_seqs} --new-token-ratio {args.new_token_ratio} --num-requests "
          f"{args.num_requests}{' --cost' if args.cost else ''}, "
          f"{time.strftime('%Y-%m-%d')}")
    wl = make_workload(args.workload, args.num_requests)
    kv = KVCacheManager(args.kv_tokens // args.block_size, args.block_size,
                        enable_prefix_caching=False)
    cfg = SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens,
                          max_num_seqs=args.max_num_seqs, max_model_len=8192,
                          new_token_ratio=args.new_token_ratio)
    sched = Scheduler(cfg, kv)
    for i, (prompt, max_tokens) in enumerate(zip(wl.prompts, wl.max_tokens)):
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        sched.add_request(Request(f"r{i}", prompt, params, [], 0, float(i)))
    steps = prompt_computed = decodes = 0
    widths = []
    cost, modelled = CostH100Llama8B(), dict.fromkeys(
        ("gemm", "decode attention", "prefill attention", "other"), 0.0)
    while sched.has_unfinished():
        out = sched.schedule()
        kv_read, attn_flops = 0, 0.0
        for rid, n in out.num_scheduled_tokens.items():
            req = sched.requests[rid]
            done = req.num_computed_tokens
            if done >= req.num_prompt_tokens and n == 1:
                decodes += 1
                kv_read += done + 1
            else:
                prompt_computed += n
                attn_flops += 4 * n * (done + n / 2) * 128 * 32 * 32  # QK^T and PV, causal
        for part, t in cost.step(out.total_num_scheduled_tokens, kv_read, attn_flops).items():
            modelled[part] += t
        widths.append(len(out.num_scheduled_tokens))
        sched.update_from_output(out, _one_token_each(sched, out))
        steps += 1
    print(f"steps {steps:,}, preemptions {sched.num_preemptions}, prompt tokens computed "
          f"{prompt_computed:,} ({prompt_computed - wl.prompt_tokens:,} recomputed), "
          f"requests per step {sum(widths) / steps:.0f} mean / {max(widths)} max, "
          f"decode rows {decodes:,}")
    if args.cost:
        total = sum(modelled.values())
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in modelled.items())
        print(f"modelled (Llama-3-8B, one H100): {total:.1f} s, "
              f"{wl.output_tokens / total:,.0f} output tok/s ({parts})")


if __name__ == "__main__":
    main()
