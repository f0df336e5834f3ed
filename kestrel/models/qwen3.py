"""Qwen3: the shared decoder plus per-head RMSNorm of q and k before RoPE.

Owns only the per-family differences. Must not duplicate decoder code from `common.py`.
"""

from __future__ import annotations

from typing import Any

from kestrel.models.common import DecoderForCausalLM, DecoderSpec


class Qwen3ForCausalLM(DecoderForCausalLM):
    @classmethod
    def decoder_spec(cls, config: Any) -> DecoderSpec:
        attention_bias = bool(getattr(config, "attention_bias", False))
        return DecoderSpec(qkv_bias=attention_bias, o_bias=attention_bias, qk_norm=True)
