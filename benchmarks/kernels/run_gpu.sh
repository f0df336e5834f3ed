#!/usr/bin/env bash
# All kernel checks and timings for one GPU session; logs go to $OUT (or ./bench_logs).
#   bash benchmarks/kernels/run_gpu.sh [--sweep] [--scaling]
set -uo pipefail
cd "$(dirname "$0")/../.."
LOG="${OUT:-bench_logs}"
mkdir -p "$LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,clocks.mem --format=csv | tee "$LOG/gpu.txt"
python3 -m pytest tests/kernels -q --confcutdir=tests/kernels -p no:cacheprovider 2>&1 | tee "$LOG/tests.txt" | tail -25
python3 benchmarks/kernels/bench_pointwise.py 2>&1 | tee "$LOG/pointwise.txt"
python3 benchmarks/kernels/bench_attention.py "$@" 2>&1 | tee "$LOG/attention.txt"
python3 benchmarks/kernels/bench_decode_small.py 2>&1 | tee "$LOG/decode_small.txt"
python3 benchmarks/kernels/bench_rope_store.py 2>&1 | tee "$LOG/rope_store.txt"
python3 benchmarks/kernels/bench_gemm.py 2>&1 | tee "$LOG/gemm.txt"
