"""The bundled default model: Hugging Face loads it, its card's held-out loss is reproducible,
the training script's smoke configuration learns, and kestrel's outputs equal transformers'."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import kestrel
from kestrel.eval import heldout_loss

MODEL_DIR = Path(kestrel.__file__).parent / "assets" / "default_model"
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_default_model.py"
PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:"]
MAX_FOLDER_BYTES = 16 * 1024 * 1024


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def hf_model():
    return AutoModelForCausalLM.from_pretrained(MODEL_DIR).to(torch.float32).eval()


def test_hf_loads_default_model(tokenizer, hf_model):
    config = AutoConfig.from_pretrained(MODEL_DIR)
    assert config.architectures == ["LlamaForCausalLM"]
    assert config.tie_word_embeddings
    assert config.num_key_value_heads < config.num_attention_heads  # GQA
    assert hf_model.lm_head.weight.data_ptr() == hf_model.model.embed_tokens.weight.data_ptr()
    card = json.loads((MODEL_DIR / "eval.json").read_text())
    assert sum(p.numel() for p in hf_model.parameters()) == card["num_parameters"]
    assert sum(f.stat().st_size for f in MODEL_DIR.iterdir()) <= MAX_FOLDER_BYTES

    ids = tokenizer("def f(x):\n    return x").input_ids
    assert ids[0] == tokenizer.bos_token_id == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "def f(x):\n    return x"
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == "<|endoftext|><|system|>\nBe brief.<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\n"
    role_ids = tokenizer(text, add_special_tokens=False).input_ids
    assert role_ids[:2] == tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|system|>"])


def test_card_heldout_loss_is_reproduced():
    card = json.loads((MODEL_DIR / "eval.json").read_text())
    readme = (MODEL_DIR / "README.md").read_text()
    match = re.search(r"\| held-out loss \(nats/token\) \| ([0-9.]+) \|", readme)
    assert match, "the model card has no held-out loss row"
    assert float(match.group(1)) == pytest.approx(card["heldout_loss"], abs=5e-5)

    loss = heldout_loss(
        str(MODEL_DIR),
        str(MODEL_DIR / "heldout_slice.txt"),
        seq_len=card["eval_seq_len"],
        max_tokens=card["eval_max_tokens"],
    )
    assert loss == pytest.approx(card["heldout_loss"], rel=0.01)


def test_smoke_training_learns(tmp_path):
    spec = importlib.util.spec_from_file_location("train_default_model", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    summary = script.main(["--smoke", "--quiet", "--out-dir", str(tmp_path)])

    lines = (tmp_path / "train_log.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    rows = [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:]]
    assert header[:5] == ["step", "tokens", "lr", "train_loss", "heldout_loss"]
    train = [float(r["train_loss"]) for r in rows]
    held = [float(r["heldout_loss"]) for r in rows if r["heldout_loss"]]
    assert train[-1] < train[0] - 0.3
    assert held[-1] < held[0]
    assert summary["steps"] == int(rows[-1]["step"])
    # The smoke folder is a complete HF folder too.
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.config.tie_word_embeddings
    assert AutoTokenizer.from_pretrained(tmp_path)("x").input_ids[0] == 0


@pytest.fixture(scope="module")
def llm():
    from kestrel import LLM

    return LLM(str(MODEL_DIR), dtype="float32")


def test_kestrel_greedy_matches_hf(llm, tokenizer, hf_model):
    from kestrel import SamplingParams

    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    assert len(outs) == len(PROMPTS)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ids = tokenizer(prompt).input_ids
        assert out.prompt_token_ids == ids
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24)
        assert out.outputs[0].token_ids == ref[0, len(ids) :].tolist(), prompt


def test_kestrel_prompt_logprobs_match_hf(llm, tokenizer, hf_model):
    from kestrel import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ids = tokenizer(prompt).input_ids
        with torch.no_grad():
            logits = hf_model(input_ids=torch.tensor([ids])).logits[0].float()
        ref = torch.log_softmax(logits, dim=-1)  # [len(ids), vocab]
        got = out.prompt_logprobs
        assert got is not None and len(got) == len(ids)
        assert got[0] is None
        for j in range(1, len(ids)):
            assert ids[j] in got[j], (prompt, j)
            assert got[j][ids[j]].logprob == pytest.approx(ref[j - 1, ids[j]].item(), abs=1e-4)
