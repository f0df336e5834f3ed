"""Engine configuration: one frozen dataclass per concern, composed into `EngineConfig`.

Owns: defaults, the mapping of flat user kwargs / CLI flags onto sub-configs, and the single
place where "auto" values are resolved (`EngineConfig.resolve`). Must not import torch models
or engine code; components receive only the sub-config they need.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelConfig:
    model: str = ""  # path to a Hugging Face model folder (config.json, *.safetensors, tokenizer)
    tokenizer: str | None = None  # tokenizer folder; defaults to `model`
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda
    attention_backend: str = "auto"  # auto (GPU: triton, else torch) | triton | torch | reference
    enforce_eager: bool = False  # never use CUDA graphs (debugging; graphs are GPU-only anyway)
    max_model_len: int | None = None  # prompt + output cap; None = config's max_position_embeddings
    global_seed: int = 0  # seeds sampling of requests that carry no seed of their own
    # Use generation_config.json sampling defaults (temperature, top_p, top_k, ...) when the user
    # does not pass SamplingParams; eos ids from it are always used.
    use_generation_config: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.attention_backend not in ("auto", "triton", "torch", "reference"):
            raise ValueError(
                "attention_backend must be auto, triton, torch or reference, "
                f"got {self.attention_backend!r}"
            )
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16  # tokens per KV block
    kv_cache_memory: int | None = None  # bytes for the KV cache; None = auto (see resolve)
    gpu_memory_utilization: float = 0.9  # fraction of GPU memory kestrel may use in total
    num_blocks: int | None = None  # force the number of KV blocks (tests, debugging)
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 1, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.kv_cache_memory is not None and self.kv_cache_memory < 1:
            raise ValueError(f"kv_cache_memory must be >= 1 byte, got {self.kv_cache_memory}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048  # token budget of one step (prefill chunks + decodes)
    max_num_seqs: int = 256  # most requests in one step
    max_model_len: int = 0  # copied from ModelConfig by resolve()
    enable_chunked_prefill: bool = True  # split prompts longer than the remaining budget
    # Schedule step N+1 while step N runs (its sampled ids feed N+1 on the device):
    # auto = on for GPUs, off on CPU (where nothing would overlap) | on | off
    async_scheduling: str = "auto"
    # Admission reserves KV for running requests' future tokens (see scheduler/reservation):
    # all of them for requests that can only end by length, this share of the remaining
    # max_tokens for those that may stop early; it rises by 0.1 after each preemption and
    # decays by 0.001 a step down to a tenth of its start (0 = admit while blocks are free).
    new_token_ratio: float = 0.7  # share of future tokens reserved at admission (0 = none)

    def __post_init__(self) -> None:
        if not 0.0 <= self.new_token_ratio <= 1.0:
            raise ValueError(f"new_token_ratio must be in [0, 1], got {self.new_token_ratio}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.async_scheduling not in ("auto", "on", "off"):
            raise ValueError(
                f"async_scheduling must be auto, on or off, got {self.async_scheduling!r}"
            )
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")


_SUB_CONFIGS = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig}


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: Any) -> EngineConfig:
        """Build from flat keyword arguments (LLM(path, **kwargs), CLI flags)."""
        parts: dict[str, dict[str, Any]] = {name: {} for name in _SUB_CONFIGS}
        parts["model"]["model"] = model
        for key, value in kwargs.items():
            owner = _owner_of(key)
            if owner is None:
                raise TypeError(f"unknown engine option {key!r}; known: {sorted(flat_fields())}")
            parts[owner][key] = value
        return cls(**{name: _SUB_CONFIGS[name](**vals) for name, vals in parts.items()})

    def resolve(self, hf_config: Any) -> EngineConfig:
        """Fill "auto" values from the model's HF config; returns a new config."""
        model = self.model
        limit = _context_limit(hf_config)
        max_len = model.max_model_len or limit
        if max_len > limit:
            raise ValueError(
                f"max_model_len={max_len} exceeds the model's context limit of {limit} tokens"
            )
        dtype = model.dtype
        if dtype == "auto":
            raw = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
            dtype = str(raw or "float32").replace("torch.", "")
            if dtype not in _DTYPES:
                dtype = "float32"
        device = model.device
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu" and dtype == "float16":
            dtype = "float32"  # NOTE: CPU float16 matmuls are slow and imprecise; upcast
        model = dataclasses.replace(model, max_model_len=max_len, dtype=dtype, device=device)
        scheduler = dataclasses.replace(self.scheduler, max_model_len=max_len)
        if scheduler.async_scheduling == "auto":
            mode = "on" if device.startswith("cuda") else "off"
            scheduler = dataclasses.replace(scheduler, async_scheduling=mode)
        if not scheduler.enable_chunked_prefill and scheduler.max_num_batched_tokens < max_len:
            scheduler = dataclasses.replace(scheduler, max_num_batched_tokens=max_len)
        return dataclasses.replace(self, model=model, scheduler=scheduler)


def _context_limit(hf_config: Any) -> int:
    limit = int(getattr(hf_config, "max_position_embeddings", 0) or 0) or 2048
    window = getattr(hf_config, "sliding_window", None)
    use_window = getattr(hf_config, "use_sliding_window", True)
    # NOTE: sliding-window attention is not implemented; serving at most one window keeps
    # outputs exact (every query sees its whole context, as the windowed model would).
    if window and use_window and window < limit:
        limit = int(window)
    return limit


def flat_fields() -> dict[str, dataclasses.Field]:
    """Every user-settable option, by its flat name (used by the CLI and from_kwargs)."""
    out: dict[str, dataclasses.Field] = {}
    for cfg in _SUB_CONFIGS.values():
        for f in fields(cfg):
            out.setdefault(f.name, f)  # NOTE: max_model_len is ModelConfig's (listed first)
    return out


def _owner_of(key: str) -> str | None:
    if key == "max_model_len":
        return "model"
    for name, cfg in _SUB_CONFIGS.items():
        if key in {f.name for f in fields(cfg)} and key != "model":
            return name
    return None

