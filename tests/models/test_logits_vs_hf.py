"""kestrel models vs transformers: prefill logits of tiny random checkpoints of every family.

HF runs each prompt alone with eager attention; kestrel runs all prompts as one varlen batch
over a paged KV cache with the reference backend. Both in float32.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from kestrel.models.loader import load_hf_config, load_model

CPU = torch.device("cpu")
PROMPT_LENS = (5, 17, 33)

CASES = [
    pytest.param("llama", False, {}, id="llama"),
    pytest.param("llama", False, {"attention_bias": True, "mlp_bias": True}, id="llama-bias"),
    pytest.param("llama3", False, {}, id="llama3-rope-scaled-tied"),
    pytest.param("mistral", False, {}, id="mistral-mqa"),
    pytest.param("qwen2", False, {}, id="qwen2"),
    pytest.param("qwen3", False, {}, id="qwen3"),
    pytest.param("qwen3", True, {"tie_word_embeddings": True}, id="qwen3-sharded-tied"),
]


def _prompts(vocab_size: int, lens: tuple[int, ...], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=gen).tolist() for n in lens]


def _load_both(path: str, dtype: torch.dtype = torch.float32) -> tuple[Any, Any, Any]:
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    hf_config = load_hf_config(path)
    return hf.eval(), load_model(path, hf_config, dtype, CPU), hf_config


@torch.inference_mode()
def _hf_logits(hf: Any, tokens: list[int]) -> torch.Tensor:
    return hf(torch.tensor([tokens])).logits[0].float()  # [len, vocab]


def _assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    assert actual.shape == expected.shape
    actual = actual.float()  # logits come in the model dtype, as HF's do
    tol = rel * max(1.0, expected.abs().max().item())
    diff = (actual - expected).abs().max().item()
    assert diff <= tol, f"max abs diff {diff:.3g} > {tol:.3g}"


@pytest.mark.parametrize("arch, shard, overrides", CASES)
def test_prefill_logits_match_hf(tiny_model, paged_runner, arch, shard, overrides) -> None:
    path = tiny_model(arch, shard=shard, **overrides)
    hf, model, hf_config = _load_both(path)
    prompts = _prompts(hf_config.vocab_size, PROMPT_LENS)
    out = paged_runner(model, hf_config).step({f"r{i}": p for i, p in enumerate(prompts)})
    for i, prompt in enumerate(prompts):
        _assert_logits_close(out[f"r{i}"], _hf_logits(hf, prompt), rel=1e-4)


@pytest.mark.parametrize("arch", ["llama3", "qwen3"])
def test_chunked_prefill_and_decode_match_single_shot(tiny_model, paged_runner, arch) -> None:
    path = tiny_model(arch)
    hf, model, hf_config = _load_both(path)
    long, short = _prompts(hf_config.vocab_size, (33, 7), seed=1)
    full = paged_runner(model, hf_config, seed=1).step({"a": long, "b": short})

    chunked = paged_runner(model, hf_config, seed=2)
    first = chunked.step({"a": long[:13]})["a"]  # ends mid-block: the next chunk shares it
    second = chunked.step({"a": long[13:], "b": short})
    torch.testing.assert_close(torch.cat([first, second["a"]]), full["a"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second["b"], full["b"], rtol=1e-5, atol=1e-5)

    # one decode step for "a" alongside a new request reading nothing from the cache
    next_token = int(full["a"][-1].argmax())
    decode = chunked.step({"a": [next_token], "c": short[:1]})
    expected = _hf_logits(hf, long + [next_token])[-1:]
    _assert_logits_close(decode["a"], expected, rel=1e-4)
    _assert_logits_close(decode["c"], _hf_logits(hf, short[:1]), rel=1e-4)


@pytest.mark.parametrize("arch", ["llama3", "qwen2"])
def test_tied_embeddings_share_storage(tiny_model, arch) -> None:
    path = tiny_model(arch)
    model = load_model(path, load_hf_config(path), torch.float32, CPU)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_bfloat16_close_to_hf_bfloat16(tiny_model, paged_runner) -> None:
    path = tiny_model("qwen3")
    hf, model, hf_config = _load_both(path, torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    (prompt,) = _prompts(hf_config.vocab_size, (17,))
    out = paged_runner(model, hf_config).step({"r": prompt})["r"]
    assert out.dtype == torch.bfloat16  # logits stay in the model dtype, as in HF
    expected = _hf_logits(hf, prompt)
    # bf16 keeps ~3 significant digits; kestrel rotates q/k in float32, HF in bf16
    _assert_logits_close(out, expected, rel=5e-2)
    assert (out.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9
