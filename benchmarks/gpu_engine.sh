#!/usr/bin/env bash
# Engine checks and throughput workloads on one GPU. Usage: bash benchmarks/gpu_engine.sh [STAGE...]
# Stages: tests w1 w2 w3 (default: tests w1). Logs and JSON go to $OUT (or ./bench_logs).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-./bench_logs}; mkdir -p "$OUT"
stages=${*:-tests w1}
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
for s in $stages; do
  case $s in
    tests) python -m pytest -q -x tests/e2e/test_gpu_engine.py 2>&1 | tail -15 ;;
    w1) python -m kestrel bench throughput --random-weights qwen3-0.6b --workload nano-vllm \
          --max-model-len 4096 --max-num-batched-tokens 16384 --hf-requests "${HF1:-0}" \
          --hf-batch-size 32 --json "$OUT/w1.json" 2>&1 | grep -v -E "generating|Loading" ;;
    w2) python -m kestrel bench throughput --random-weights llama3-8b --workload batch1 \
          --max-model-len 4096 --hf-requests "${HF2:-0}" --json "$OUT/w2.json" 2>&1 \
          | grep -v -E "generating|Loading" ;;
    w3) python -m kestrel bench throughput --random-weights llama3-8b --workload long \
          --max-model-len 4096 --max-num-batched-tokens 8192 --max-num-seqs 512 \
          --num-requests "${N3:-1000}" --json "$OUT/w3.json" 2>&1 | grep -v -E "generating|Loading" ;;
  esac
done
