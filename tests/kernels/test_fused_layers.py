"""The fused decode paths (norm/activation inside the GEMV; q/k norm + RoPE + K/V store in one
kernel) against the unfused modules, end to end through the engine.

On a GPU they run whenever their conditions hold (one 16-bit row; the Triton backend). Here
the conditions are widened to float32 CPU tensors so the interpreter runs the same kernels.
"""

from __future__ import annotations

import pytest
import torch

import kestrel.layers.fused as fused
from kestrel import LLM, SamplingParams
from kestrel.layers.attention import Attention

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="interpreter variant; tests/e2e/test_gpu_engine.py on GPUs"
)


def _generate(path: str, backend: str) -> list:
    llm = LLM(path, dtype="float32", device="cpu", attention_backend=backend,
              max_model_len=128)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=3)
    # One prompt, so every decode step has one row: the case the fused GEMVs serve.
    out = llm.generate([[5, 9, 13, 2, 7, 11, 3]], params, use_tqdm=False)[0].outputs[0]
    return [out.token_ids, [{t: lp.logprob for t, lp in d.items()} for d in out.logprobs]]


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_fused_paths_match_unfused(arch, tiny_model, monkeypatch):
    path = tiny_model(arch, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    # Unfused: the reference backend stores K/V itself; one-row GEMVs stay plain on CPU.
    ref_tokens, ref_lps = _generate(path, "reference")

    calls = {"gemv": 0, "rope": 0}

    def takes_gemv(x: torch.Tensor) -> bool:
        calls["gemv"] += x.dim() == 2 and x.shape[0] == 1
        return x.dim() == 2 and x.shape[0] == 1

    def fuses_rope_store(self: Attention, qkv: torch.Tensor) -> bool:
        calls["rope"] += 1
        return True

    monkeypatch.setattr(fused, "takes_gemv", takes_gemv)
    monkeypatch.setattr(Attention, "fuses_rope_store", fuses_rope_store)
    tokens, lps = _generate(path, "triton")
    assert calls["gemv"] > 0 and calls["rope"] > 0, calls
    assert tokens == ref_tokens
    for got, want in zip(lps, ref_lps):
        assert got.keys() == want.keys()
        for t in want:
            assert abs(got[t] - want[t]) < 1e-4, (t, got[t], want[t])


def test_rope_store_leaves_keys_for_prefill(tiny_model, monkeypatch):
    """Where prefill reads this step's keys from qkv (Hopper), the fused kernel writes rotated
    k back and the layer hands k/v to the backend: same tokens as the unfused path."""
    from kestrel.attention.triton_backend import TritonAttentionBackend

    path = tiny_model("qwen3", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    ref_tokens, ref_lps = _generate(path, "reference")
    seen = []
    attend = TritonAttentionBackend.attend

    def spy(self, q, kv_cache, meta, scale, new_kv=None):
        seen.append(new_kv is not None and new_kv[0].shape == (q.shape[0], 2, 16))
        return attend(self, q, kv_cache, meta, scale, new_kv)

    monkeypatch.setattr(Attention, "fuses_rope_store", lambda self, qkv: True)
    monkeypatch.setattr(TritonAttentionBackend, "reads_new_kv",
                        lambda self, meta, cache, dtype: meta.max_query_len > 1)
    monkeypatch.setattr(TritonAttentionBackend, "attend", spy)
    tokens, lps = _generate(path, "triton")
    assert any(seen) and not all(seen)  # prefill steps got new_kv, decode steps did not
    assert tokens == ref_tokens
    for got, want in zip(lps, ref_lps):
        for t in want:
            assert abs(got[t] - want[t]) < 1e-4, (t, got[t], want[t])
