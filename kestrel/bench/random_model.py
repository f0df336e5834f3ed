"""Real-shape HF model folders with random weights, for benchmarks.

Owns the published shapes (Qwen3-0.6B, Llama-3-8B, Qwen3-8B) and writing them as a folder that
both kestrel and HF transformers load: config.json, safetensors shards with HF parameter
names, generation_config.json and a word-level tokenizer covering the whole vocabulary.
Weights are drawn on the fastest device available, so an 8B folder takes seconds, not minutes.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

SHAPES: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=1024,
        intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        attention_bias=False, hidden_act="silu",
    ),
    "llama3-8b": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=8192,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, hidden_act="silu",
    ),
    "qwen3-8b": dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=4096,
        intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
        attention_bias=False, hidden_act="silu",
    ),
}
_SHARD_BYTES = 4 << 30


def _param_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h),
                                          "model.norm.weight": (h,)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
        if cfg["model_type"] == "qwen3":
            shapes[p + "self_attn.q_norm.weight"] = (hd,)
            shapes[p + "self_attn.k_norm.weight"] = (hd,)
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def _write_tokenizer(path: str, vocab_size: int) -> None:
    """A word-level tokenizer with one token per id, so every id decodes to text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<unk>": 1}
    vocab.update({f"w{i}": i for i in range(2, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                            unk_token="<unk>").save_pretrained(path)


def save_random_weights(path: str, shape: str, dtype: torch.dtype = torch.bfloat16,
                        seed: int = 0, **overrides: Any) -> str:
    """Write (or reuse) a random-weight folder of a published shape; returns the path.

    overrides: config fields to change (tests shrink the shape this way).
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; supported: {sorted(SHAPES)}")
    from safetensors.torch import save_file

    cfg = dict(SHAPES[shape], bos_token_id=0, eos_token_id=0,
               dtype=str(dtype).replace("torch.", ""), **overrides)
    marker = os.path.join(path, ".complete")
    if os.path.exists(marker):
        return path
    os.makedirs(path, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    index: dict[str, str] = {}
    shard_bytes, num = 0, 0

    def flush() -> None:
        nonlocal shard, shard_bytes, num
        name = f"model-{num:05d}.safetensors"
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        index.update({k: name for k in shard})
        shard, shard_bytes, num = {}, 0, num + 1

    for name, dims in _param_shapes(cfg).items():
        if len(dims) == 1:  # norms around 1 keep activations in range
            t = 1.0 + 0.1 * torch.randn(dims, generator=gen, device=device)
        else:
            t = torch.randn(dims, generator=gen, device=device) * (dims[1] ** -0.5)
        shard[name] = t.to(dtype).cpu()
        shard_bytes += shard[name].numel() * shard[name].element_size()
        if shard_bytes >= _SHARD_BYTES:
            flush()
    if shard:
        flush()
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": index}, fh)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(cfg, fh, indent=2)
    with open(os.path.join(path, "generation_config.json"), "w") as fh:
        json.dump({"bos_token_id": 0, "eos_token_id": 0}, fh)
    _write_tokenizer(path, cfg["vocab_size"])
    open(marker, "w").close()
    return path
