"""Whole-engine parity with HF transformers: greedy continuations and their logprobs."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from kestrel import LLM, SamplingParams

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], list(range(20, 61)), [3], list(range(100, 118))]
NUM_NEW = 32


def hf_greedy(model, prompt: list[int], num_new: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding by full recomputation; returns tokens and the log_softmax per step."""
    ids = list(prompt)
    logps = []
    with torch.no_grad():
        for _ in range(num_new):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            logps.append(torch.log_softmax(logits, -1))
            ids.append(int(logits.argmax()))
    return ids[len(prompt):], logps


@pytest.mark.parametrize("arch", ["llama", "llama3", "mistral", "qwen2", "qwen3"])
def test_greedy_tokens_and_logprobs_match_hf(tiny_model, arch):
    path = tiny_model(arch)
    llm = LLM(path, dtype="float32", max_num_batched_tokens=24)  # chunked prompts too
    params = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True, logprobs=3)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                              attn_implementation="eager")
    for prompt, out in zip(PROMPTS, outs):
        comp = out.outputs[0]
        ref_tokens, ref_logps = hf_greedy(hf, prompt, NUM_NEW)
        assert comp.token_ids == ref_tokens
        assert comp.finish_reason == "length"
        for tok, entry, ref in zip(comp.token_ids, comp.logprobs, ref_logps):
            assert entry[tok].rank == 1
            assert abs(entry[tok].logprob - ref[tok].item()) < 1e-4
            top = torch.topk(ref, 3)
            for t, lp in zip(top.indices.tolist(), top.values.tolist()):
                assert abs(entry[t].logprob - lp) < 1e-4
        assert comp.cumulative_logprob == pytest.approx(
            sum(r[t].item() for t, r in zip(ref_tokens, ref_logps)), abs=1e-3
        )


def test_prompt_logprobs_match_hf(tiny_model):
    path = tiny_model("qwen2")
    llm = LLM(path, dtype="float32", max_num_batched_tokens=16)
    prompt = list(range(30, 70))
    out = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=2),
                       use_tqdm=False)[0]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), -1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        tok = prompt[pos]
        assert abs(entry[tok].logprob - ref[pos - 1, tok].item()) < 1e-4
        assert entry[tok].rank == int((ref[pos - 1] > ref[pos - 1, tok]).sum()) + 1
