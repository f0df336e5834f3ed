"""The shared pre-norm RoPE decoder that Llama, Mistral, Qwen2 and Qwen3 are built from.

Owns the blocks (RopeAttention, GatedMLP, DecoderLayer, DecoderModel) and `DecoderForCausalLM`,
the base class family files specialize with a `DecoderSpec`. Must not read checkpoints (the
loader does) or build attention metadata (the runner does).

Inputs are a flattened varlen batch: every tensor's first dim is the token dim of all requests
of the step concatenated; there is no batch dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kestrel.layers.activation import ACTIVATIONS
from kestrel.layers.attention import Attention
from kestrel.layers.embedding import LMHead, VocabEmbedding
from kestrel.layers.fused import act_linear, rms_norm_linear
from kestrel.layers.linear import MergedLinear, QKVLinear, ReplicatedLinear
from kestrel.layers.norm import RMSNorm
from kestrel.layers.rotary import RotaryEmbedding, rope_parameters


@dataclass(frozen=True)
class DecoderSpec:
    """The per-family switches of the shared decoder."""

    qkv_bias: bool = False  # bias on q/k/v projections
    o_bias: bool = False  # bias on the attention output projection
    mlp_bias: bool = False  # bias on gate/up/down projections
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3)


def head_dim_of(cfg: Any) -> int:
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def num_kv_heads_of(cfg: Any) -> int:
    return int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)


class RopeAttention(nn.Module):
    def __init__(self, cfg: Any, spec: DecoderSpec, rotary: RotaryEmbedding, layer_idx: int):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = num_kv_heads_of(cfg)
        self.head_dim = head_dim_of(cfg)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = QKVLinear(
            cfg.hidden_size, self.head_dim, self.num_heads, self.num_kv_heads, spec.qkv_bias
        )
        self.o_proj = ReplicatedLinear(self.q_size, cfg.hidden_size, spec.o_bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if spec.qk_norm else None
        self.rotary = rotary
        self.attn = Attention(
            self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5, layer_idx
        )

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self.attend(positions, self.qkv_proj(hidden))

    def attend(self, positions: torch.Tensor, qkv: torch.Tensor) -> torch.Tensor:
        """qkv [T, q_size + 2 * kv_size] (the projection's output) -> [T, hidden_size]."""
        if self.attn.fuses_rope_store(qkv):
            # One kernel for q/k norm, RoPE and the K/V store instead of up to four.
            out = self.attn.forward_qkv(
                qkv,
                positions,
                self.rotary.cos_sin_cache,
                self.q_norm.weight if self.q_norm is not None else None,
                self.k_norm.weight if self.k_norm is not None else None,
                self.q_norm.eps if self.q_norm is not None else 0.0,
            )
            return self.o_proj(out)
        num_tokens = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)  # [T, num_heads, head_dim]
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, num_kv_heads, head_dim]
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, num_kv_heads, head_dim]
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        return self.o_proj(self.attn(q, k, v))  # [T, hidden_size]


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with gate and up computed by one merged GEMM."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, bias: bool):
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden_size, [intermediate_size] * 2, bias)
        self.down_proj = ReplicatedLinear(intermediate_size, hidden_size, bias)
        self.act_fn = ACTIVATIONS.get(hidden_act)()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.gate_up_proj(x))  # [T, hidden_size]

    def down(self, gate_up: torch.Tensor) -> torch.Tensor:
        """The merged [gate | up] projection's output -> [T, hidden_size]."""
        return act_linear(self.act_fn, self.down_proj, gate_up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Any, spec: DecoderSpec, rotary: RotaryEmbedding, layer_idx: int):
        super().__init__()
        self.self_attn = RopeAttention(cfg, spec, rotary, layer_idx)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, spec.mlp_bias)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's output delta, running residual); their sum is the layer output.
        Each norm runs with the projection after it so one-row steps can fuse the two."""
        attn = self.self_attn
        qkv, residual = rms_norm_linear(self.input_layernorm, attn.qkv_proj, hidden, residual)
        hidden = attn.attend(positions, qkv)
        gate_up, residual = rms_norm_linear(
            self.post_attention_layernorm, self.mlp.gate_up_proj, hidden, residual
        )
        return self.mlp.down(gate_up), residual


class DecoderModel(nn.Module):
    def __init__(self, cfg: Any, spec: DecoderSpec):
        super().__init__()
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size)
        # One RoPE table shared by every layer (it can be large for long-context models).
        rotary = RotaryEmbedding(
            head_dim_of(cfg), cfg.max_position_embeddings, rope_parameters(cfg)
        )
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, spec, rotary, i) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # [T, hidden_size]
        residual: torch.Tensor | None = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden  # [T, hidden_size]


class DecoderForCausalLM(nn.Module):
    """Base of every family: `model` (the decoder stack) and `lm_head`, HF parameter names.

    Subclasses set `decoder_spec(config)`. `packed_modules_mapping` tells the loader which
    checkpoint projections are stored inside a merged parameter: checkpoint name fragment ->
    (merged name fragment, shard id).
    """

    packed_modules_mapping: dict[str, tuple[str, str | int]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: Any):
        super().__init__()
        self.config = config
        self.model = DecoderModel(config, self.decoder_spec(config))
        tie = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = LMHead(
            config.vocab_size, config.hidden_size, self.model.embed_tokens if tie else None
        )

    @classmethod
    def decoder_spec(cls, config: Any) -> DecoderSpec:
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions [num_tokens] -> final-normed hidden states [num_tokens, hidden]."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden_size] -> logits [N, vocab_size] in the model dtype."""
        return self.lm_head(hidden)
