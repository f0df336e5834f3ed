#!/usr/bin/env bash
# Serving benchmark on one GPU: `kestrel serve` on a random-weight Qwen3-0.6B-shape folder,
# driven by `kestrel bench serve` at several request rates. Server wheels travel in .whl/.
set -u
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
OUT=${OUT:-./bench_logs}; mkdir -p "$OUT"
MODEL=$(python -c "from kestrel.bench.throughput import save_random_weights_cached as s
print(s('/tmp/kestrel-random-weights', 'qwen3-0.6b'))")
python -m kestrel serve "$MODEL" --port 8000 --max-model-len 4096 > "$OUT/server.log" 2>&1 &
for _ in $(seq 120); do curl -sf localhost:8000/health >/dev/null && break; sleep 1; done
python -m kestrel bench serve --tokenizer "$MODEL" --num-prompts "${N:-500}" --input-len 512 \
  --output-len 128 --range-ratio 0.25 --request-rate ${RATES:-8 16 32 64 inf} \
  --result-json "$OUT/serve_h100.json" --plot "$OUT/serve_h100.png" 2>&1 | grep -v regex
tail -3 "$OUT/server.log"
