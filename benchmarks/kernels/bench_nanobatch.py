"""Can decode attention hide the dense layers? Two nano-batches, workload-1 step shapes.

    python benchmarks/kernels/bench_nanobatch.py [--batch 256] [--dense-sms 12 20 32]

A decode step of the Qwen3-0.6B shape (28 layers: qkv GEMM, kestrel's paged decode attention
over contexts 100-1,100, o GEMM, gate_up GEMM, SiLU-and-mul, down GEMM; cuBLAS GEMMs) spends
~85% of its time in attention, which reads the KV cache and leaves the tensor cores idle, and
the rest in GEMMs that are latency-bound at these sizes. Split the batch in two halves A and B
and the dense layers of one half have no dependency on the attention of the other:

    attention stream   attn A(l)  attn B(l)   attn A(l+1)  attn B(l+1) ...
    dense stream                  dense A(l)  dense B(l)   dense A(l+1) ...

On one GPU this only pays if the two streams run at the same time, which the earlier
experiments (NOTES.md) found they do not when each kernel may fill every SM. So each layout is
run on plain streams and on disjoint SM sets (CUDA green contexts; the dense stream gets
`--dense-sms` SMs, attention the rest), eagerly and, where capture works, as one graph.
Prints the step time of each layout against one full batch on one stream.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
import triton.testing
from bench_overlap import _green_streams, _on, _timed
from bench_utils import copy_bandwidth_tbps, device_summary, print_table

from kestrel.kernels.attention.decode import choose_num_splits, decode_attention

DTYPE = torch.bfloat16
LAYERS, PAGE = 28, 16
HIDDEN, INTER, HQ, HKV, D = 1024, 3072, 16, 8, 128


class Step:
    """One decode step's weights, caches and inputs; `half(i)` is nano-batch i of 2."""

    def __init__(self, batch: int, gen: torch.Generator) -> None:
        def w(n, k):
            return torch.randn(n, k, device="cuda", dtype=DTYPE) / k**0.5

        self.batch = batch
        self.weights = [(w((HQ + 2 * HKV) * D, HIDDEN), w(HIDDEN, HQ * D), w(2 * INTER, HIDDEN),
                         w(HIDDEN, INTER)) for _ in range(LAYERS)]
        self.seq_lens = torch.randint(100, 1101, (batch,), generator=gen, dtype=torch.int32)
        pages_per_req = 1100 // PAGE + 1
        self.caches = []
        for _ in range(LAYERS):
            pages = batch * pages_per_req
            cache = torch.randn(2, pages, PAGE, HKV, D, device="cuda", dtype=DTYPE)
            bt = torch.randperm(pages, generator=gen).view(batch, pages_per_req)
            self.caches.append((cache, bt.to(torch.int32).cuda()))
        self.seq_lens = self.seq_lens.cuda()
        self.x = torch.randn(batch, HIDDEN, device="cuda", dtype=DTYPE)
        self.kv_bytes = 2 * int(self.seq_lens.sum()) * HKV * D * 2 * LAYERS
        self.w_bytes = sum(t.numel() * 2 for ws in self.weights for t in ws)

    def rows(self, part: int, parts: int) -> slice:
        n = self.batch // parts
        return slice(part * n, self.batch if part == parts - 1 else (part + 1) * n)

    def qkv(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weights[layer][0])  # [rows, (16 + 16) * 128]

    def attn(self, layer: int, qkv: torch.Tensor, rows: slice) -> torch.Tensor:
        cache, bt = self.caches[layer]
        n = qkv.shape[0]
        q = qkv[:, : HQ * D].reshape(n, HQ, D)
        splits = choose_num_splits(n, HKV, qkv.device)
        return decode_attention(q, cache, bt[rows], self.seq_lens[rows], D**-0.5, splits)

    def dense(self, layer: int, attn: torch.Tensor) -> torch.Tensor:
        _, wo, wgu, wd = self.weights[layer]
        h = F.linear(attn.reshape(attn.shape[0], HQ * D), wo)
        gu = F.linear(h, wgu)  # [rows, 2 * INTER]
        return F.linear(F.silu(gu[:, :INTER]) * gu[:, INTER:], wd)

    def serial(self) -> None:
        h = self.x
        for layer in range(LAYERS):
            h = self.dense(layer, self.attn(layer, self.qkv(layer, h), slice(None)))

    def pipelined(self, s_attn: torch.cuda.Stream, s_dense: torch.cuda.Stream) -> None:
        """Two halves: attention of one half beside the dense layers of the other."""
        cur = torch.cuda.current_stream()
        s_attn.wait_stream(cur)
        s_dense.wait_stream(cur)
        halves = [self.rows(i, 2) for i in range(2)]
        with torch.cuda.stream(s_dense):
            qkv = [self.qkv(0, self.x[r]) for r in halves]
        ready = [torch.cuda.Event(), torch.cuda.Event()]
        for e in ready:
            e.record(s_dense)
        for layer in range(LAYERS):
            done, attn = [], []
            for i, r in enumerate(halves):
                s_attn.wait_event(ready[i])
                with torch.cuda.stream(s_attn):
                    attn.append(self.attn(layer, qkv[i], r))
                done.append(torch.cuda.Event())
                done[i].record(s_attn)
            for i in range(2):
                s_dense.wait_event(done[i])
                with torch.cuda.stream(s_dense):
                    h = self.dense(layer, attn[i])
                    if layer + 1 < LAYERS:
                        qkv[i] = self.qkv(layer + 1, h)
                ready[i] = torch.cuda.Event()
                ready[i].record(s_dense)
        cur.wait_stream(s_attn)
        cur.wait_stream(s_dense)


def _graph_ms(fn, stream: torch.cuda.Stream | None = None) -> float | str:
    try:
        fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=stream):
            fn()
        torch.cuda.synchronize()
        return triton.testing.do_bench(g.replay, warmup=10, rep=200, return_mode="median")
    except RuntimeError as e:
        torch.cuda.synchronize()
        return f"capture failed: {str(e).splitlines()[0][:60]}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dense-sms", type=int, nargs="*", default=[12, 20, 32])
    args = ap.parse_args()
    print(f"# bench_nanobatch.py --batch {args.batch} --dense-sms "
          f"{' '.join(map(str, args.dense_sms))}")
    print(f"# {device_summary()}, {time.strftime('%Y-%m-%d')}")
    bw = copy_bandwidth_tbps()
    step = Step(args.batch, torch.Generator().manual_seed(0))
    floor = (step.kv_bytes + step.w_bytes) / bw / 1e9
    print(f"# copy bandwidth {bw:.2f} TB/s; one step moves {step.kv_bytes / 1e9:.2f} GB of KV "
          f"and {step.w_bytes / 1e9:.2f} GB of weights: {floor:.2f} ms at that bandwidth")

    rows = []
    base = _timed(step.serial)
    rows.append(("one batch, one stream", "eager", base, ""))
    gbase = _graph_ms(step.serial)
    rows.append(("one batch, one stream", "graph", gbase, ""))

    def add(label, mode, ms):
        ref = gbase if mode == "graph" and isinstance(gbase, float) else base
        note = f"{ref / ms:.3f}x" if isinstance(ms, float) else ""
        rows.append((label, mode, ms, note))

    sa, sd = torch.cuda.Stream(), torch.cuda.Stream()
    add("halves, plain streams", "eager", _timed(lambda: step.pipelined(sa, sd)))
    add("halves, plain streams", "graph", _graph_ms(lambda: step.pipelined(sa, sd)))
    for n in args.dense_sms:
        try:
            ga, gd, na, nd = _green_streams(n)
        except (OSError, RuntimeError, AttributeError) as e:
            print(f"# green contexts unavailable: {e}")
            break
        try:
            add(f"one batch on {na} SMs", "eager",
                _timed(lambda ga=ga: _on([(ga, step.serial)])))
            label = f"halves, attention {na} SMs / dense {nd} SMs"
            add(label, "eager", _timed(lambda ga=ga, gd=gd: step.pipelined(ga, gd)))
            add(label, "graph", _graph_ms(lambda ga=ga, gd=gd: step.pipelined(ga, gd), ga))
        except RuntimeError as e:
            print(f"# green-context launch failed: {str(e).splitlines()[0]}")
            torch.cuda.synchronize()
            break
    print_table(["layout", "launch", "ms per step", "vs one batch"], rows)


if __name__ == "__main__":
    main()
