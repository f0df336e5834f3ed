"""`kestrel bench throughput`: the published workloads are drawn exactly, and a CPU run on a
tiny model writes every figure the GPU runs report."""

from __future__ import annotations

import json

from kestrel.bench.throughput import _decode_steps, make_workload
from kestrel.entrypoints.cli import main


def test_workload_totals_match_the_published_draws():
    nano = make_workload("nano-vllm")
    assert (len(nano.prompts), nano.prompt_tokens, nano.output_tokens) == (256, 142_827, 133_966)
    assert nano.temperature == 0.6
    batch1 = make_workload("batch1")
    assert (len(batch1.prompts[0]), batch1.max_tokens, batch1.temperature) == (128, [512], 0.0)
    long = make_workload("long", num_requests=3)
    assert [len(p) for p in long.prompts] == [1024] * 3 and long.max_tokens == [1024] * 3
    # folding ids into a small vocabulary keeps the lengths
    small = make_workload("nano-vllm", num_requests=4, vocab_size=300)
    assert all(0 <= t < 300 for p in small.prompts for t in p)
    assert [len(p) for p in small.prompts] == [len(p) for p in nano.prompts[:4]]


def test_decode_steps_of_a_continuous_batch():
    assert _decode_steps([5, 3, 4], seats=3) == 5
    assert _decode_steps([5, 3, 4], seats=1) == 12
    assert _decode_steps([5, 3, 4], seats=2) == 7  # 4 starts when 3 ends


def test_decode_steps_limited_by_kv_capacity():
    # Three seats, but the cache holds only two requests of 10 KV tokens at once.
    assert _decode_steps([5, 3, 4], seats=3, sizes=[10, 10, 10], capacity=20) == 7
    assert _decode_steps([5, 3, 4], seats=3, sizes=[10, 10, 10], capacity=30) == 5
    # A request larger than the whole cache still runs (alone).
    assert _decode_steps([5, 3], seats=3, sizes=[50, 10], capacity=20) == 8


def test_cpu_run_writes_the_report(tiny_model, tmp_path, capsys):
    path = tiny_model("llama", max_position_embeddings=1024)
    out = tmp_path / "w.json"
    rc = main(["bench", "throughput", "--model", path, "--workload", "batch1",
               "--max-model-len", "1024", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    k = report["kestrel"]
    assert report["workload"]["output_tokens"] == 512
    assert k["output_tok_s"] > 0 and k["ms_per_token_batch1"] > 0
    assert k["preemptions"] == 0 and k["jit_compiles_in_run"] == 0
    assert 0 < report["roofline"]["roofline_tok_s"]
    assert 0 < report["roofline"]["serial_roofline_tok_s"] < report["roofline"]["roofline_tok_s"]
    assert k["kv_capacity_tokens"] > 0 and report["matmul_TFLOPs"] > 0
    printed = capsys.readouterr().out
    assert "of roofline" in printed and "during the run" in printed
