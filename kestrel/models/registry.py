"""HF `architectures[0]` -> kestrel model class.

Owns the list of supported architectures. Entries are lazy so importing the registry does not
import every model file. Must not build or load models.
"""

from __future__ import annotations

from torch import nn

from kestrel.utils.registry import Registry

MODEL_REGISTRY: Registry[type[nn.Module]] = Registry("architecture")
MODEL_REGISTRY.register("LlamaForCausalLM", "kestrel.models.llama:LlamaForCausalLM")
MODEL_REGISTRY.register("MistralForCausalLM", "kestrel.models.llama:MistralForCausalLM")
MODEL_REGISTRY.register("Qwen2ForCausalLM", "kestrel.models.llama:Qwen2ForCausalLM")
MODEL_REGISTRY.register("Qwen3ForCausalLM", "kestrel.models.qwen3:Qwen3ForCausalLM")


def get_model_class(architecture: str) -> type[nn.Module]:
    """Raises ValueError listing the supported architectures if `architecture` is unknown."""
    return MODEL_REGISTRY.get(architecture)


def supported_architectures() -> list[str]:
    return MODEL_REGISTRY.names()
