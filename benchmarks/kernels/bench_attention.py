"""Benchmark paged decode and causal prefill attention against PyTorch SDPA.

    python benchmarks/kernels/bench_attention.py [--sweep] [--scaling]

Decode reports achieved TB/s (K/V bytes read once) next to the measured copy bandwidth;
prefill reports TFLOP/s (causal: 2 * B * H * N^2 * D) next to the measured bf16 matmul rate.
SDPA peers (flash, cuDNN) run on contiguous K/V, so they skip the page indirection.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from bench_utils import (
    bench_rotating,
    copy_bandwidth_tbps,
    device_summary,
    matmul_tflops,
    print_table,
)
from torch.nn.attention import SDPBackend, sdpa_kernel

from kestrel.kernels.attention.decode import DecodeConfig, choose_num_splits, decode_attention
from kestrel.kernels.attention.prefill import (
    PrefillConfig,
    _prefill_kernel,
    default_prefill_config,
    prefill_attention,
)
from kestrel.kernels.attention.prefill_hopper import takes_hopper_prefill
from kestrel.kernels.kv_store import store_kv

DTYPE = torch.bfloat16
PAGE = 16
SDPA_BACKENDS = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}


def _paged_cache(k: torch.Tensor, v: torch.Tensor, gen: torch.Generator):
    """Scatter contiguous [B, N, Hkv, D] k/v into a cache of shuffled pages."""
    batch, seq, num_kv_heads, head_dim = k.shape
    pages = batch * seq // PAGE
    perm = torch.randperm(pages, generator=gen).to("cuda")
    block_table = perm.view(batch, seq // PAGE).to(torch.int32)
    cache = torch.empty(2, pages, PAGE, num_kv_heads, head_dim, dtype=k.dtype, device="cuda")
    pos = torch.arange(seq, device="cuda")
    slots = (block_table.long()[:, pos // PAGE] * PAGE + pos % PAGE).reshape(-1)
    store_kv(
        k.reshape(-1, num_kv_heads, head_dim), v.reshape(-1, num_kv_heads, head_dim), cache, slots
    )
    return cache, block_table


def _sdpa(name: str, q, k, v, causal: bool, gqa: bool):
    """q [B, Hq, M, D], k/v [B, Hkv, N, D]; None if the backend refuses these inputs."""

    def run(q, k, v):
        with sdpa_kernel(SDPA_BACKENDS[name]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    try:
        run(q, k, v)
        torch.cuda.synchronize()
        return run
    except RuntimeError:
        return None


def _last_compiled(kernel) -> tuple:
    """(registers/thread, spills, shared KB) of the most recently compiled variant."""
    try:
        compiled = list(kernel.device_caches[0][0].values())[-1]
        compiled._init_handles()
        return compiled.n_regs, compiled.n_spills, compiled.metadata.shared // 1024
    except Exception:  # cache layout differs across Triton versions
        return ("?", "?", "?")


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def make_decode_inputs(batch, ctx, hq=32, hkv=8, d=128, sets=2, with_ref=True):
    """Rotating sets of (q, k, v, cache, block_table, seq_lens) plus an fp32 reference."""
    gen = torch.Generator().manual_seed(batch * 131 + ctx)
    inputs = []
    for _ in range(sets):
        q = torch.randn(batch, hq, d, device="cuda", dtype=DTYPE)
        k = torch.randn(batch, ctx, hkv, d, device="cuda", dtype=DTYPE)
        v = torch.randn(batch, ctx, hkv, d, device="cuda", dtype=DTYPE)
        cache, bt = _paged_cache(k, v, gen)
        seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        inputs.append((q, k, v, cache, bt, seq_lens))
    if not with_ref:
        return inputs, None
    q, k, v = inputs[0][:3]
    ref = F.scaled_dot_product_attention(
        q[:, :, None].float(),
        k.transpose(1, 2).float(),
        v.transpose(1, 2).float(),
        enable_gqa=True,
    )[:, :, 0]
    return inputs, ref


def run_decode(inputs, ref, config=None, num_splits=None, peers=True):
    """{impl: ms}, {impl: TB/s} and kestrel's error for decode over prepared inputs."""
    batch, ctx, hkv, d = inputs[0][1].shape
    nbytes = 2 * batch * ctx * hkv * d * DTYPE.itemsize  # K and V, each read once

    def ours(q, k, v, cache, bt, seq_lens):
        return decode_attention(q, cache, bt, seq_lens, d**-0.5, num_splits, config=config)

    err = _rel_err(ours(*inputs[0]), ref) if ref is not None else float("nan")
    ms = {"kestrel": bench_rotating(ours, inputs)}
    if peers:
        sdpa_in = [
            (x[0][:, :, None], x[1].transpose(1, 2).contiguous(), x[2].transpose(1, 2).contiguous())
            for x in inputs
        ]
        for name in SDPA_BACKENDS:
            fn = _sdpa(name, *sdpa_in[0], causal=False, gqa=True)
            ms[name] = bench_rotating(fn, sdpa_in) if fn else float("nan")
    return ms, {name: nbytes / t / 1e9 for name, t in ms.items()}, err


def _split_qkv(qkv: torch.Tensor, hq: int, hkv: int):
    """q, k, v as views of one [..., hq + 2 hkv, D] buffer, as the model's projection gives."""
    return qkv.split([hq, hkv, hkv], dim=-2)


def make_prefill_inputs(batch=4, seq=4096, hq=32, hkv=32, d=128, sets=2):
    """Rotating sets of (q, k, v, cache, block_table): q/k/v [B, N, H, D] views of one qkv
    buffer, the cache holding k/v in shuffled pages."""
    gen = torch.Generator().manual_seed(seq + hkv)
    inputs = []
    for _ in range(sets):
        qkv = torch.randn(batch, seq, hq + 2 * hkv, d, device="cuda", dtype=DTYPE)
        q, k, v = _split_qkv(qkv, hq, hkv)
        cache, bt = _paged_cache(k, v, gen)
        inputs.append((q, k, v, cache, bt))
    return inputs


def _prefill_impls(hq: int, hkv: int, d: int, max_q: int, config):
    """{row name: fn(q, k, v, cache, bt, qsl, seq_lens)}. With config None: "kestrel" is the
    engine's call (the chunk's own K/V rows passed as new_kv), "kestrel-paged" reads every key
    from the cache, "kestrel-triton" is the portable kernel."""

    def call(cfg, own):
        def run(q, k, v, cache, bt, qsl, seq_lens):
            new_kv = (k.reshape(-1, hkv, d), v.reshape(-1, hkv, d)) if own else None
            return prefill_attention(q.reshape(-1, hq, d), cache, bt, qsl, seq_lens, max_q,
                                     d**-0.5, config=cfg, new_kv=new_kv)
        return run

    if config is not None:
        return {"kestrel": call(config, False)}
    impls = {"kestrel": call(None, True)}
    probe = torch.empty(1, hq, d, device="cuda", dtype=DTYPE)
    cache = torch.empty(2, 1, PAGE, hkv, d, device="cuda", dtype=DTYPE)
    if takes_hopper_prefill(probe, cache, probe):
        impls["kestrel-paged"] = call(None, False)
        impls["kestrel-triton"] = call(default_prefill_config(probe.device, d, max_q), False)
    return impls


def run_prefill(inputs, config=None, peers=True):
    """{impl: ms}, {impl: TFLOP/s} and kestrel's error vs SDPA flash."""
    batch, seq, hq, d = inputs[0][0].shape
    hkv = inputs[0][1].shape[2]
    qsl = torch.arange(0, batch + 1, device="cuda", dtype=torch.int32) * seq
    seq_lens = torch.full((batch,), seq, dtype=torch.int32, device="cuda")
    flops = 2 * batch * hq * seq * seq * d  # QK^T and PV, half the square under the mask
    impls = _prefill_impls(hq, hkv, d, seq, config)
    ms = {
        name: bench_rotating(lambda *x, fn=fn: fn(*x, qsl, seq_lens), inputs)
        for name, fn in impls.items()
    }
    # Peers take contiguous [B, H, N, D]-strided copies, the layout they are fastest on.
    sdpa_in = [tuple(t.contiguous().transpose(1, 2) for t in x[:3]) for x in inputs[:1]]
    flash = _sdpa("sdpa-flash", *sdpa_in[0], causal=True, gqa=hq != hkv)
    ref = flash(*sdpa_in[0]).transpose(1, 2).reshape(-1, hq, d) if flash else None
    ours = impls["kestrel"](*inputs[0], qsl, seq_lens)
    err = _rel_err(ours, ref) if ref is not None else float("nan")
    if peers:
        sdpa_in += [tuple(t.contiguous().transpose(1, 2) for t in x[:3]) for x in inputs[1:]]
        for name in SDPA_BACKENDS:
            fn = _sdpa(name, *sdpa_in[0], causal=True, gqa=hq != hkv)
            ms[name] = bench_rotating(fn, sdpa_in) if fn else float("nan")
    return ms, {name: flops / t / 1e9 for name, t in ms.items()}, err


def sweep_decode() -> None:
    print("\n# decode sweep: batch 64, ctx 4096, 32/8 heads, d 128 (TB/s)")
    inputs, ref = make_decode_inputs(64, 4096, sets=1)
    rows = []
    for bn in (64,):
        for warps in (2, 4):
            for stages in (3,):
                for splits in (1, 2, 3, 4, 8):
                    cfg = DecodeConfig(bn, warps, stages)
                    try:
                        _, rate, err = run_decode(inputs, ref, cfg, splits, peers=False)
                        rows.append((bn, warps, stages, splits, rate["kestrel"], err))
                    except Exception as exc:  # out of shared memory for this tile shape
                        rows.append((bn, warps, stages, splits, float("nan"), type(exc).__name__))
    print_table(["block_n", "warps", "stages", "splits", "TB/s", "rel_err"], rows)


def sweep_prefill() -> None:
    print("\n# prefill sweep: 4 x 32 heads x 4096, d 128, causal (TFLOP/s)")
    inputs = make_prefill_inputs(sets=1)
    rows = []
    configs = [
        PrefillConfig(256, 64, 8, 3),
        PrefillConfig(256, 64, 8, 4),
        PrefillConfig(128, 64, 4, 2),
        PrefillConfig(128, 64, 8, 2),
        PrefillConfig(128, 32, 4, 2),
        PrefillConfig(128, 32, 4, 3),
        PrefillConfig(128, 32, 4, 4),
        PrefillConfig(128, 128, 4, 2),
        PrefillConfig(128, 128, 8, 3),
        PrefillConfig(64, 64, 4, 2),
    ]
    for cfg in configs:
        try:
            _, rate, err = run_prefill(inputs, cfg, peers=False)
            rows.append((*cfg, rate["kestrel"], err, *_last_compiled(_prefill_kernel)))
        except Exception as exc:  # out of shared memory/registers for this tile shape
            rows.append((*cfg, float("nan"), type(exc).__name__, "", "", ""))
    header = ["block_m", "block_n", "warps", "stages", "TFLOP/s", "rel_err"]
    print_table(header + ["regs", "spills", "smem_KB"], rows)


def scaling() -> None:
    print("\n# decode scaling (TB/s, default config, auto splits); 32/8 heads, d 128")
    rows = []
    for batch in (1, 8, 64, 256, 512):
        for ctx in (128, 1024, 4096, 32768):
            if batch * ctx > 2**21:  # keep each cache under 8 GiB
                continue
            inputs, ref = make_decode_inputs(batch, ctx, sets=1, with_ref=False)
            ms, rate, _ = run_decode(inputs, ref)
            del inputs, ref
            splits = choose_num_splits(batch, 8, torch.device("cuda"))
            rows.append(
                (
                    batch,
                    ctx,
                    splits,
                    ms["kestrel"] * 1e3,
                    rate["kestrel"],
                    rate["sdpa-flash"],
                    rate["sdpa-cudnn"],
                )
            )
    print_table(["batch", "ctx", "splits", "us", "kestrel", "flash", "cudnn"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sweep", choices=["decode", "prefill", "all"], help="config sweeps")
    parser.add_argument("--no-main", action="store_true", help="skip the headline comparison")
    parser.add_argument("--scaling", action="store_true", help="decode batch x context table")
    args = parser.parse_args()
    print(device_summary())
    copy_bw, mm = copy_bandwidth_tbps(), matmul_tflops()
    print(f"ceilings: copy {copy_bw:.2f} TB/s (read+write), bf16 matmul {mm:.0f} TFLOP/s")
    if args.sweep in ("decode", "all"):
        sweep_decode()
    if args.sweep in ("prefill", "all"):
        sweep_prefill()
    if args.scaling:
        scaling()
    if args.no_main:
        return

    ms, rate, err = run_decode(*make_decode_inputs(64, 4096))
    print("\n# decode: batch 64, ctx 4096, 32 q / 8 kv heads, d 128, bf16, page 16")
    print_table(
        ["impl", "us", "TB/s", "of copy bw"],
        [(n, ms[n] * 1e3, rate[n], rate[n] / copy_bw) for n in rate],
    )
    print(f"kestrel rel err vs fp32 SDPA: {err:.2e}")
    global PAGE
    for page, hkv in ((16, 32), (16, 8), (64, 32), (64, 8)):
        PAGE = page  # cache page size of the inputs built next
        ms, rate, err = run_prefill(make_prefill_inputs(hkv=hkv), peers=page == 16)
        print(f"\n# prefill: 4 x 32 q / {hkv} kv heads x 4096, d 128, causal, bf16, page {page}")
        print_table(
            ["impl", "ms", "TFLOP/s", "of matmul"],
            [(n, ms[n], rate[n], rate[n] / mm) for n in rate],
        )
        print(f"kestrel rel err vs SDPA flash: {err:.2e}")
    PAGE = 16
    extend()


def extend(batch=4, prefix=3072, chunk=1024, hq=32, hkv=8, d=128) -> None:
    """A chunked-prefill step: `chunk` queries per request on a cached `prefix`."""
    seq = prefix + chunk
    inputs = []
    for x in make_prefill_inputs(batch, seq, hq, hkv, d):
        # This step's q/k/v: the chunk's rows of a fresh qkv buffer (the cache holds all keys).
        qkv = torch.cat([t[:, prefix:] for t in x[:3]], dim=2)
        inputs.append((*_split_qkv(qkv, hq, hkv), *x[3:]))
    qsl = torch.arange(0, batch + 1, device="cuda", dtype=torch.int32) * chunk
    seq_lens = torch.full((batch,), seq, dtype=torch.int32, device="cuda")
    flops = 4 * batch * hq * d * (chunk * prefix + chunk * chunk / 2)
    outs, ms = {}, {}
    for name, fn in _prefill_impls(hq, hkv, d, chunk, None).items():
        outs[name] = fn(*inputs[0], qsl, seq_lens)
        ms[name] = bench_rotating(lambda *x, fn=fn: fn(*x, qsl, seq_lens), inputs)
    print(f"\n# extend: {batch} x {chunk} queries on a {prefix}-token prefix, {hq} q / {hkv} kv "
          f"heads, d 128, bf16, page {PAGE}")
    print_table(["impl", "ms", "TFLOP/s"], [(n, ms[n], flops / ms[n] / 1e9) for n in ms])
    for other in list(outs)[1:]:
        print(f"kestrel vs {other} rel err: {_rel_err(outs['kestrel'], outs[other]):.2e}")


if __name__ == "__main__":
    main()
