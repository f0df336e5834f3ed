"""Llama 2/3, Mistral and Qwen2: the shared decoder with bias switches read from the config.

Owns only the per-family differences. Must not duplicate decoder code from `common.py`.
"""

from __future__ import annotations

from typing import Any

from kestrel.models.common import DecoderForCausalLM, DecoderSpec


class LlamaForCausalLM(DecoderForCausalLM):
    @classmethod
    def decoder_spec(cls, config: Any) -> DecoderSpec:
        attention_bias = bool(getattr(config, "attention_bias", False))
        return DecoderSpec(
            qkv_bias=attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
        )


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral is Llama with a sliding window; see `EngineConfig` for how the window is handled."""


class Qwen2ForCausalLM(DecoderForCausalLM):
    @classmethod
    def decoder_spec(cls, config: Any) -> DecoderSpec:
        return DecoderSpec(qkv_bias=True)  # Qwen2 always has q/k/v biases and no others
