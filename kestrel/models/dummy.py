"""Tiny random Hugging Face checkpoints for tests, demos and benchmarks.

Owns `save_random_model`: a complete model folder (config.json, safetensors weights,
generation_config.json, a trained byte-level BPE tokenizer with a chat template) written with
transformers' own model classes, so the folder is exactly what HF would produce. Everything is
deterministic for a given seed. Must not be imported by the serving path.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import torch

SUPPORTED_ARCHS = ("llama", "llama3", "mistral", "qwen2", "qwen3")
SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")  # ids 0, 1, 2: bos, eos, pad
TOKENIZER_VOCAB_SIZE = 384
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)

_TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
)
# arch -> (transformers config class name, model class name, overrides of _TINY)
_ARCHS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": False}),
    "llama3": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {
            "tie_word_embeddings": True,
            "num_hidden_layers": 3,
            "rope_theta": 500000.0,
            # original context 64 puts the tiny head_dim's frequencies in all three bands
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
    ),
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        {"tie_word_embeddings": False, "num_key_value_heads": 1, "sliding_window": None},
    ),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    # head_dim 32 != hidden_size / num_heads exercises Qwen3's explicit head_dim
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"tie_word_embeddings": False, "head_dim": 32}),
}


def save_random_model(
    path: str | Path,
    arch: str,
    *,
    seed: int = 0,
    dtype: torch.dtype | str = torch.float32,
    shard: bool = False,
    **config_overrides: Any,
) -> str:
    """Write a tiny random `arch` model folder at `path` and return the path as a string.

    arch: one of SUPPORTED_ARCHS ("llama3" is Llama with llama3 rope scaling).
    dtype: dtype of the saved weights. shard: write two or more safetensors shards plus
    model.safetensors.index.json. config_overrides: any HF config field (e.g.
    num_hidden_layers=4, attention_bias=True); vocab_size may only grow past the tokenizer's.
    """
    import transformers
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    if arch not in _ARCHS:
        raise ValueError(f"unknown dummy arch {arch!r}; supported: {list(SUPPORTED_ARCHS)}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=int(config_overrides.get("max_position_embeddings", 512)),
    )
    tokenizer.save_pretrained(str(out))

    config_name, model_name, arch_overrides = _ARCHS[arch]
    ids = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}  # see SPECIAL_TOKENS
    kwargs = {**_TINY, **arch_overrides, **ids, "vocab_size": len(tokenizer), **config_overrides}
    if kwargs["vocab_size"] < len(tokenizer):
        raise ValueError(f"vocab_size must be >= the tokenizer's {len(tokenizer)} tokens")
    config = getattr(transformers, config_name)(**kwargs)
    with torch.random.fork_rng(devices=[]):  # HF's own init must not move the caller's RNG
        torch.manual_seed(seed)
        model = getattr(transformers, model_name)(config)
    _randomize(model, seed)
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = model.to(torch_dtype)
    model.config.dtype = torch_dtype
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    max_shard_size = weight_bytes // 2 + 1 if shard else "50GB"
    model.save_pretrained(str(out), max_shard_size=max_shard_size)
    GenerationConfig(**ids).save_pretrained(str(out))
    return str(out)


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    # Replace HF's init (norms = 1, biases = 0, std 0.02) with values that make a loading bug
    # visible: norm weights and biases are random too, and the logits are peaked enough that
    # greedy decoding does not hinge on near-ties.
    gen = torch.Generator().manual_seed(seed)
    hidden = model.config.hidden_size
    for name, param in sorted(model.named_parameters()):
        noise = torch.randn(param.shape, generator=gen)
        if name.endswith("norm.weight"):
            value = 1.0 + 0.1 * noise
        elif name.endswith(".bias"):
            value = 0.1 * noise
        elif "embed_tokens" in name or "lm_head" in name:
            value = noise * 3.0 / math.sqrt(hidden)  # logits std ~3, tied or not
        else:  # [out, in] projections: keep activations at unit scale
            value = noise / math.sqrt(param.shape[1])
        param.copy_(value)


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
    )
    return tok.to_str()


def build_tokenizer() -> Any:
    """The dummy byte-level BPE tokenizer (a `tokenizers.Tokenizer`); adds <s> in front."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_tokenizer_json())


_SUBJECTS = ("the cat", "a small bird", "my friend", "the old man", "our team", "this model")
_VERBS = ("sees", "likes", "builds", "reads", "finds", "writes", "moves", "keeps")
_OBJECTS = ("a red box", "the long river", "some fresh bread", "every token", "the blue sky")
_ENDINGS = (".", "!", "?", " today.", " again.", " at night.")
_NAMES = ("value", "count", "items", "result", "index", "total")


def training_corpus(num_lines: int = 400) -> list[str]:
    """Fixed English sentences and Python-like lines, built with an explicit LCG so the text
    (and so the tokenizer) never depends on a library's random generator."""
    state = 12345
    lines = []
    for i in range(num_lines):
        picks = []
        for _ in range(5):
            state = (1103515245 * state + 12345) % (1 << 31)
            picks.append(state >> 8)
        if i % 3 == 2:
            name, other = _NAMES[picks[0] % 6], _NAMES[picks[1] % 6]
            lines.append(f"def f{i}({name}):\n    {other} = {name} + {picks[2] % 100}\n")
            lines.append(f"    return [{other} * 2 for _ in range(10)]\n")
        else:
            sentence = (
                f"{_SUBJECTS[picks[0] % 6]} {_VERBS[picks[1] % 8]} "
                f"{_OBJECTS[picks[2] % 5]}{_ENDINGS[picks[3] % 6]}"
            )
            lines.append(sentence[0].upper() + sentence[1:] + f" It is {picks[4] % 1000}.\n")
    return lines
