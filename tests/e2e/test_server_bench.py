"""`kestrel bench serve`: arrival schedules, seeded workloads, and a short run against a live
kestrel server (JSON result, plot, failure counting, the CLI)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("aiohttp")

from kestrel import EngineConfig  # noqa: E402
from kestrel.bench.datasets import load_jsonl, random_requests  # noqa: E402
from kestrel.bench.serving import (  # noqa: E402
    ClientConfig,
    arrival_delays,
    markdown_table,
    run_rates,
)
from kestrel.entrypoints.cli import main as cli_main  # noqa: E402
from kestrel.entrypoints.openai.api_server import (  # noqa: E402
    ServerConfig,
    ServerThread,
    build_server,
)


@pytest.fixture(scope="module")
def live(tiny_model):
    built = build_server(EngineConfig.from_kwargs(tiny_model("llama"), dtype="float32",
                                                  max_model_len=256),
                         ServerConfig(served_model_name=["tiny"]))
    thread = ServerThread(built.app).start()
    built.url = thread.url
    yield built
    thread.stop()
    built.engine.shutdown()


def test_arrivals_poisson_gamma_and_all_at_once():
    assert arrival_delays(5, float("inf"), 1.0, 0) == [0.0] * 5
    poisson = np.array(arrival_delays(20000, 4.0, 1.0, seed=1))
    assert poisson.mean() == pytest.approx(0.25, rel=0.03)
    assert poisson.std() / poisson.mean() == pytest.approx(1.0, rel=0.05)  # exponential
    bursty = np.array(arrival_delays(20000, 4.0, 0.25, seed=1))
    assert bursty.mean() == pytest.approx(0.25, rel=0.05)
    assert bursty.std() / bursty.mean() == pytest.approx(2.0, rel=0.08)  # CV = 1/sqrt(shape)
    assert arrival_delays(10, 4.0, 1.0, seed=3) == arrival_delays(10, 4.0, 1.0, seed=3)
    with pytest.raises(ValueError):
        arrival_delays(3, 0.0, 1.0, 0)


def test_random_workload_is_seeded_and_in_range(tiny_model):
    from kestrel.engine.tokenizer import load_tokenizer

    a = random_requests(50, 40, 10, range_ratio=0.5, seed=3)
    assert a == random_requests(50, 40, 10, range_ratio=0.5, seed=3)
    assert a != random_requests(50, 40, 10, range_ratio=0.5, seed=4)
    assert all(20 <= r.prompt_len <= 60 and 5 <= r.output_len <= 15 for r in a)
    tok = load_tokenizer(tiny_model("llama"))
    exact = random_requests(20, 32, 4, seed=0, tokenizer=tok, prefix_len=8)
    for r in exact:
        assert r.prompt_len == len(tok(r.prompt, add_special_tokens=False).input_ids)
        assert abs(r.prompt_len - 40) <= 12  # re-tokenizing decoded ids may merge a few
    assert len({r.prompt[:10] for r in exact}) == 1  # the shared prefix


def test_jsonl_loader(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "hello there", "max_tokens": 3}\n\n'
                    '{"messages": [{"role": "user", "content": "hi"}]}\n')
    rows = load_jsonl(path, output_len=7, num=5)
    assert [r.output_len for r in rows] == [3, 7, 3, 7, 3]
    assert rows[1].messages == [{"role": "user", "content": "hi"}] and rows[0].prompt_len == 2
    path.write_text('{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match="prompts.jsonl:1"):
        load_jsonl(path)


def test_bench_against_live_server(live, tmp_path):
    requests = random_requests(8, 24, 6, seed=0)
    cfg = ClientConfig(base_url=live.url, max_concurrency=4)
    out_json, out_png = tmp_path / "result.json", tmp_path / "curve.png"
    summaries = run_rates(requests, cfg, [float("inf"), 40.0], str(out_json), str(out_png))
    for s in summaries:
        assert s["completed"] == 8 and s["failed"] == 0 and s["model"] == "tiny"
        assert s["total_output_tokens"] == sum(r.output_len for r in requests)
        assert s["total_input_tokens"] > 8 * 20  # the server's usage (bos included)
        assert 0 < s["ttft_ms"]["p50"] <= s["ttft_ms"]["p99"] <= s["e2e_ms"]["p99"]
        assert s["tpot_ms"]["mean"] > 0 and s["itl_ms"]["mean"] > 0
        assert s["request_throughput"] > 0 and s["output_throughput"] > 0
    saved = json.loads(out_json.read_text())
    assert [r["request_rate"] for r in saved["results"]] == ["inf", 40.0]
    assert out_png.read_bytes()[:4] == b"\x89PNG"
    assert markdown_table(summaries).count("\n") == 3
    chat = run_rates(requests[:4], ClientConfig(base_url=live.url, endpoint="chat"),
                     [float("inf")], num_warmups=0)
    assert chat[0]["completed"] == 4 and chat[0]["total_output_tokens"] == sum(
        r.output_len for r in requests[:4])
    wrong = run_rates(requests[:3], ClientConfig(base_url=live.url, model="nope"),
                      [float("inf")], num_warmups=0)
    assert wrong[0]["failed"] == 3 and "HTTP 404" in wrong[0]["errors"][0]


def test_cli_bench_serve(live, tmp_path, capsys):
    code = cli_main(["bench", "serve", "--base-url", live.url, "--num-prompts", "4",
                     "--input-len", "16", "--output-len", "4", "--request-rate", "inf", "50",
                     "--result-json", str(tmp_path / "r.json")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "TTFT" in printed and "output throughput" in printed and "| rate (req/s)" in printed
    assert len(json.loads((tmp_path / "r.json").read_text())["results"]) == 2
