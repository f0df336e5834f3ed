"""kestrel: a fast, correct LLM inference and serving engine for Hugging Face models."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "Engine", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput"]

if TYPE_CHECKING:
    from kestrel.config import EngineConfig
    from kestrel.engine.engine import Engine
    from kestrel.engine.llm import LLM
    from kestrel.outputs import CompletionOutput, RequestOutput
    from kestrel.sampling_params import SamplingParams

_LAZY = {
    "LLM": "kestrel.engine.llm",
    "Engine": "kestrel.engine.engine",
    "EngineConfig": "kestrel.config",
    "SamplingParams": "kestrel.sampling_params",
    "RequestOutput": "kestrel.outputs",
    "CompletionOutput": "kestrel.outputs",
}


def __getattr__(name: str) -> Any:
    # Lazy so `kestrel --help` and light imports do not pay for torch/transformers.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kestrel' has no attribute {name!r}")
