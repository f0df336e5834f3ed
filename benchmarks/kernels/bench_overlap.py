"""Can a prefill chunk run beside decode steps? Two CUDA graphs on two streams, Llama-3-8B shapes.

    python benchmarks/kernels/bench_overlap.py [--batch 213] [--prefill-rows 2048]

Graph A is a decode-step proxy of workload 3 (memory-bound): 32 layers of qkv GEMM, paged
decode attention (kestrel's kernel, contexts 1,024-2,048, 32 q / 8 kv heads, 16-token pages),
o GEMM, gate_up GEMM, SiLU-and-mul and down GEMM at `--batch` rows, each layer with its own KV
(4 weight sets and 4 caches, cycled; L2 holds none of them). Graph B is a prefill proxy
(compute-bound): the same 4 GEMMs per layer at `--prefill-rows` rows. Prefill weights are read
once per chunk, so running B on a side stream costs no second weight read of note; the question
is whether the GPU interleaves the two: it prints A alone, B alone, both launched together on
two streams (A at high priority, or both equal), and the share of the shorter graph hidden.

`--green N ...` also runs both eagerly on disjoint SM sets (CUDA green contexts from the driver
API, B on N SMs and A on the rest): the SM partition a persistent-kernel design would fix. That
path has not been run on a GPU yet (benchmarks/kernels/NOTES.md, "Left open").
"""

from __future__ import annotations

import argparse
import ctypes
import time

import torch
import torch.nn.functional as F
import triton.testing
from bench_utils import copy_bandwidth_tbps, device_summary, matmul_tflops, print_table

from kestrel.kernels.attention.decode import choose_num_splits, decode_attention

DTYPE = torch.bfloat16
LAYERS, SETS, PAGE = 32, 4, 16
HIDDEN, INTER, HQ, HKV, D = 4096, 14336, 32, 8, 128


def _weights():
    def w(n, k):
        return torch.randn(n, k, device="cuda", dtype=DTYPE) / k**0.5

    return [(w((HQ + 2 * HKV) * D, HIDDEN), w(HIDDEN, HQ * D), w(2 * INTER, HIDDEN),
             w(HIDDEN, INTER)) for _ in range(SETS)]


def _caches(batch: int, max_ctx: int, gen: torch.Generator):
    pages_per_req = max_ctx // PAGE
    out = []
    for _ in range(SETS):
        pages = batch * pages_per_req
        cache = torch.randn(2, pages, PAGE, HKV, D, device="cuda", dtype=DTYPE)
        bt = torch.randperm(pages, generator=gen).view(batch, pages_per_req).to("cuda")
        out.append((cache, bt.to(torch.int32)))
    return out


def _graph(fn):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    torch.cuda.synchronize()
    return g


def _green_streams(num_sms_b: int):
    """Two streams on disjoint SM sets (CUDA green contexts through the driver API): B gets
    `num_sms_b` SMs, A the rest. Returns (stream_a, stream_b, sms_a, sms_b)."""
    cu = ctypes.CDLL("libcuda.so.1")
    dev = ctypes.c_int()
    _check(cu.cuDeviceGet(ctypes.byref(dev), torch.cuda.current_device()), "cuDeviceGet")
    whole, part, rest = (ctypes.create_string_buffer(4096) for _ in range(3))
    _check(cu.cuDeviceGetDevResource(dev, whole, 1), "cuDeviceGetDevResource")  # 1: SMs
    groups = ctypes.c_uint(1)
    _check(cu.cuDevSmResourceSplitByCount(part, ctypes.byref(groups), whole, rest, 0,
                                          num_sms_b), "cuDevSmResourceSplitByCount")
    streams, counts = [], []
    for res in (rest, part):
        desc, ctx, stream = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
        _check(cu.cuDevResourceGenerateDesc(ctypes.byref(desc), res, 1), "GenerateDesc")
        _check(cu.cuGreenCtxCreate(ctypes.byref(ctx), desc, dev, 1), "cuGreenCtxCreate")
        _check(cu.cuGreenCtxStreamCreate(ctypes.byref(stream), ctx, 1, 0), "StreamCreate")
        streams.append(torch.cuda.ExternalStream(stream.value))
        counts.append(int.from_bytes(res.raw[96:100], "little"))  # CUdevSmResource.smCount
    return streams[0], streams[1], counts[0], counts[1]


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"{what} failed with CUresult {rc}")


def _timed(launch, reps: int = 7) -> float:
    """Median ms of launch() (eager kernels on any streams that it joins back)."""
    times = []
    for _ in range(reps + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        launch()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times[1:])[reps // 2]


def _on(streams_fns):
    """Run each fn on its stream, all after the current stream's work, then join them."""
    cur = torch.cuda.current_stream()
    for stream, _ in streams_fns:
        stream.wait_stream(cur)
    for stream, fn in streams_fns:
        with torch.cuda.stream(stream):
            fn()
    for stream, _ in streams_fns:
        cur.wait_stream(stream)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=213)
    ap.add_argument("--prefill-rows", type=int, default=2048)
    ap.add_argument("--decode-steps", type=int, default=2, help="decode steps in graph A")
    ap.add_argument("--green", type=int, nargs="*", default=[],
                    help="also run eagerly on disjoint SM sets, B getting each of these counts")
    args = ap.parse_args()
    print(f"# bench_overlap.py --batch {args.batch} --prefill-rows {args.prefill_rows} "
          f"--decode-steps {args.decode_steps}")
    print(f"# {device_summary()}, {time.strftime('%Y-%m-%d')}")
    bw, mm = copy_bandwidth_tbps(), matmul_tflops()
    print(f"# copy bandwidth {bw:.2f} TB/s, bf16 matmul {mm:.0f} TFLOP/s")

    gen = torch.Generator().manual_seed(0)
    b, p = args.batch, args.prefill_rows
    weights = _weights()
    caches = _caches(b, 2048, gen)
    seq_lens = torch.randint(1024, 2049, (b,), generator=gen, dtype=torch.int32).to("cuda")
    splits = choose_num_splits(b, HKV, seq_lens.device)
    x = torch.randn(b, HIDDEN, device="cuda", dtype=DTYPE)
    xp = torch.randn(p, HIDDEN, device="cuda", dtype=DTYPE)
    hp = torch.randn(p, INTER, device="cuda", dtype=DTYPE)

    def decode():
        for _ in range(args.decode_steps):
            h = x
            for layer in range(LAYERS):
                wqkv, wo, wgu, wd = weights[layer % SETS]
                cache, bt = caches[layer % SETS]
                qkv = F.linear(h, wqkv)  # [b, (32 + 16) * 128]
                q = qkv[:, : HQ * D].reshape(b, HQ, D)
                attn = decode_attention(q, cache, bt, seq_lens, D**-0.5, splits)
                h = F.linear(attn.reshape(b, HQ * D), wo)
                gu = F.linear(h, wgu)  # [b, 2 * INTER]
                h = F.linear(F.silu(gu[:, :INTER]) * gu[:, INTER:], wd)

    def prefill():
        for layer in range(LAYERS):
            wqkv, wo, wgu, wd = weights[layer % SETS]
            F.linear(xp, wqkv)
            F.linear(xp, wo)
            F.linear(xp, wgu)
            F.linear(hp, wd)

    ga, gb = _graph(decode), _graph(prefill)
    rows = []

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=400, return_mode="median")

    ta, tb = bench(ga.replay), bench(gb.replay)
    kv_bytes = 2 * int(seq_lens.sum()) * HKV * D * 2 * LAYERS * args.decode_steps
    w_bytes = sum(t.numel() * 2 for t in weights[0]) * LAYERS * args.decode_steps
    rows.append(("A: decode alone", ta, (kv_bytes + w_bytes) / ta / 1e9, ""))
    flops = 2 * p * sum(t.numel() for t in weights[0]) * LAYERS
    rows.append(("B: prefill alone", tb, "", f"{flops / tb / 1e9:.0f} TFLOP/s"))
    for label, prio_a, prio_b in (("A || B, A high priority", -1, 0), ("A || B, equal", 0, 0),
                                  ("A || B, B high priority", 0, -1)):
        sa, sb = torch.cuda.Stream(priority=prio_a), torch.cuda.Stream(priority=prio_b)

        t = bench(lambda sa=sa, sb=sb: _on([(sb, gb.replay), (sa, ga.replay)]))
        hidden = (ta + tb - t) / min(ta, tb)
        rows.append((label, t, "", f"{hidden:.0%} of the shorter hidden"))
    # B's GEMMs told to leave SMs free (cuBLASLt SM count target), A at high priority.
    carve = getattr(torch._C, "_set_sm_carveout_experimental", None)
    for sms in (32, 66) if carve else ():
        try:
            torch.backends.cuda.preferred_blas_library("cublaslt")
            carve(sms)
            gc = _graph(prefill)
        except (RuntimeError, TypeError) as e:
            print(f"# SM carveout unavailable: {e}")
            break
        finally:
            carve(0)
            torch.backends.cuda.preferred_blas_library("default")
        tc = bench(gc.replay)
        sa, sb = torch.cuda.Stream(priority=-1), torch.cuda.Stream(priority=0)

        t = bench(lambda sa=sa, sb=sb, gc=gc: _on([(sb, gc.replay), (sa, ga.replay)]))
        rows.append((f"B, {sms} SMs left free", tc, "", f"{flops / tc / 1e9:.0f} TFLOP/s"))
        rows.append((f"A || B({sms} SMs free)", t, "",
                     f"{(ta + tc - t) / min(ta, tc):.0%} of the shorter hidden"))
    rows.append(("serial A + B", ta + tb, "", ""))
    print_table(["graphs", "ms", "TB/s (KV + weights)", "note"], rows)
    if args.green:
        green(args.green, decode, prefill)


def green(counts, decode, prefill) -> None:
    """Eager launches (no graphs) on streams of disjoint green contexts."""
    cur = torch.cuda.current_stream()
    ea, eb = _timed(decode), _timed(prefill)
    rows = [("eager A, all SMs", ea, ""), ("eager B, all SMs", eb, ""),
            ("eager serial A + B", ea + eb, "")]
    for n in counts:
        try:
            sa, sb, na, nb = _green_streams(n)
        except (OSError, RuntimeError, AttributeError) as e:
            print(f"# green contexts unavailable: {e}")
            return
        ga = _timed(lambda sa=sa: _on([(sa, decode)]))
        gb = _timed(lambda sb=sb: _on([(sb, prefill)]))
        both = _timed(lambda sa=sa, sb=sb: _on([(sb, prefill), (sa, decode)]))
        rows += [(f"A alone on {na} SMs", ga, ""), (f"B alone on {nb} SMs", gb, ""),
                 (f"A ({na} SMs) || B ({nb} SMs)", both,
                  f"{1 - both / (ea + eb):.1%} under eager serial")]
    assert torch.cuda.current_stream() == cur
    print_table(["eager, green contexts", "ms", "note"], rows)


if __name__ == "__main__":
    main()
