"""Replay a throughput workload through the scheduler alone, on the CPU (no model, no GPU).

    python benchmarks/sim_schedule.py [--workload long] [--kv-tokens 437968]

The real `Scheduler` and `KVCacheManager` run every step of the workload with a runner that
returns one token per finished row and never an EOS (the workloads ignore EOS). This counts what
the scheduling policy alone decides: steps, preemptions, prompt tokens recomputed after them
and how wide decode runs. Workload 3 ("long") on the Llama-3-8B shape gets 437,968 KV tokens on
one H100 80GB (the engine's own sizing at gpu_memory_utilization 0.9); pass the count printed
by `kestrel bench throughput` for another card.
"""

from __future__ import annotations

import argparse
import time

from kestrel.bench.throughput import WORKLOADS, make_workload
from kestrel.config import SchedulerConfig
from kestrel.kv.kv_manager import KVCacheManager
from kestrel.outputs import ModelOutput
from kestrel.request import Request
from kestrel.sampling_params import SamplingParams
from kestrel.scheduler.scheduler import Scheduler


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
    args = ap.parse_args()
    print(f"# sim_schedule.py --workload {args.workload} --kv-tokens {args.kv_tokens} "
          f"--max-num-batched-tokens {args.max_num_batched_tokens} --max-num-seqs "
          f"{args.max_num_seqs} --new-token-ratio {args.new_token_ratio}, "
          f"{time.strftime('%Y-%m-%d')}")
    wl = make_workload(args.workload)
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
    while sched.has_unfinished():
        out = sched.schedule()
        for rid, n in out.num_scheduled_tokens.items():
            req = sched.requests[rid]
            if req.num_computed_tokens >= req.num_prompt_tokens and n == 1:
                decodes += 1
            else:
                prompt_computed += n
        widths.append(len(out.num_scheduled_tokens))
        sched.update_from_output(out, _one_token_each(sched, out))
        steps += 1
    print(f"steps {steps:,}, preemptions {sched.num_preemptions}, prompt tokens computed "
          f"{prompt_computed:,} ({prompt_computed - wl.prompt_tokens:,} recomputed), "
          f"requests per step {sum(widths) / steps:.0f} mean / {max(widths)} max, "
          f"decode rows {decodes:,}")


if __name__ == "__main__":
    main()
