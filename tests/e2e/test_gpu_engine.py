"""The GPU engine (Triton backend, CUDA graphs, bf16) against the reference backend."""

from __future__ import annotations

import pytest
import torch

from kestrel import LLM, SamplingParams

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

PROMPTS = [[3 + i % 300 for i in range(n)] for n in (1, 7, 33, 130, 600)]


def check_logprobs_close(a, b, name_a: str, name_b: str) -> None:
    """Tokens agree until the first mismatch; there, each side's choice must be in the other's
    top logprobs (then the sequences may diverge and comparison stops)."""
    for i, (x, y) in enumerate(zip(a, b)):
        for pos, (tx, ty) in enumerate(zip(x.token_ids, y.token_ids)):
            if tx != ty:
                assert tx in y.logprobs[pos], f"seq {i} pos {pos}: {name_a} {tx} not in {name_b}"
                assert ty in x.logprobs[pos], f"seq {i} pos {pos}: {name_b} {ty} not in {name_a}"
                break


@pytest.fixture(scope="module")
def path(tiny_model):
    return tiny_model("qwen3", hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                      max_position_embeddings=2048)


def _run(path, **opts):
    llm = LLM(path, dtype="bfloat16", device="cuda", **opts)
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, logprobs=5)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    return [o.outputs[0] for o in outs], llm


def test_cuda_graphs_on_off_identical(path):
    eager, _ = _run(path, enforce_eager=True)
    graphs, llm = _run(path)
    assert llm.engine.executor.runner.graphs is not None
    assert [c.token_ids for c in graphs] == [c.token_ids for c in eager]


def test_triton_backend_close_to_reference(path):
    ref, _ = _run(path, attention_backend="reference", enforce_eager=True)
    tri, _ = _run(path, attention_backend="triton", max_num_batched_tokens=256)
    check_logprobs_close(ref, tri, "reference", "triton")


def test_batch1_fused_decode(path, monkeypatch):
    """One request at a time: the fused GEMVs and the fused norm + RoPE + K/V store kernel
    against the unfused modules, and graphs on/off identical on that path too."""
    import kestrel.layers.fused as fused

    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, logprobs=5)

    def one_by_one(llm):
        return [llm.generate([p], params, use_tqdm=False)[0].outputs[0] for p in PROMPTS[1:4]]

    graphs = one_by_one(LLM(path, dtype="bfloat16", device="cuda"))
    eager = one_by_one(LLM(path, dtype="bfloat16", device="cuda", enforce_eager=True))
    assert [c.token_ids for c in graphs] == [c.token_ids for c in eager]
    monkeypatch.setattr(fused, "takes_gemv", lambda x: False)
    unfused = one_by_one(LLM(path, dtype="bfloat16", device="cuda",
                             attention_backend="reference", enforce_eager=True))
    check_logprobs_close(unfused, graphs, "unfused", "fused")


def test_prefill_own_keys_identical(path, monkeypatch):
    """Prefill reading a chunk's own keys from the qkv rows (Hopper) gives the tokens of
    reading them back from the cache, with chunked prefill on cached prefixes too."""
    from kestrel.attention.triton_backend import TritonAttentionBackend

    calls = []
    reads = TritonAttentionBackend.reads_new_kv

    def spy(self, meta, cache, dtype):
        calls.append(reads(self, meta, cache, dtype))
        return calls[-1]

    monkeypatch.setattr(TritonAttentionBackend, "reads_new_kv", spy)
    own, _ = _run(path, max_num_batched_tokens=256)
    if torch.cuda.get_device_capability() == (9, 0):
        assert any(calls)
    monkeypatch.setattr(TritonAttentionBackend, "reads_new_kv", lambda *a: False)
    cached, _ = _run(path, max_num_batched_tokens=256)
    assert [c.token_ids for c in own] == [c.token_ids for c in cached]


def test_wide_decode_batches(path):
    """40 requests: decode steps of 33-40 rows (cuBLAS GEMMs, 48-row graphs padded) give the
    same tokens with graphs on and off, close to the reference backend."""
    prompts = [[3 + (i * 7 + j) % 300 for j in range(3 + 11 * i)] for i in range(40)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=5)

    def run(**opts):
        llm = LLM(path, dtype="bfloat16", device="cuda", **opts)
        return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]

    graphs = run()
    eager = run(enforce_eager=True)
    assert [c.token_ids for c in graphs] == [c.token_ids for c in eager]
    ref = run(attention_backend="reference", enforce_eager=True)
    check_logprobs_close(ref, graphs, "reference", "triton")
