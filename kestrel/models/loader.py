"""Hugging Face checkpoint loading: config validation, safetensors discovery, weight loading.

Owns the checks that turn a folder into a servable (config, model) pair with errors that say
what is wrong, the mapping of checkpoint names onto kestrel parameters (packed q/k/v and
gate/up, tied embeddings) and the completeness check after loading. Must not allocate KV
caches or know about requests.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from kestrel.layers.activation import ACTIVATIONS
from kestrel.layers.linear import LinearBase
from kestrel.layers.rotary import check_rope_parameters, rope_parameters
from kestrel.models.common import head_dim_of, num_kv_heads_of
from kestrel.models.registry import get_model_class, supported_architectures

INDEX_FILE = "model.safetensors.index.json"
_POSITIVE_INT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
)


def load_hf_config(model_dir: str) -> Any:
    """Read and validate `model_dir`/config.json; returns a transformers PretrainedConfig.

    Raises FileNotFoundError for a missing folder, config.json or weight files and ValueError
    for an unsupported architecture or a config kestrel cannot serve. Also checks that the
    safetensors weights are present, so a bad folder fails before anything is allocated.
    """
    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {model_dir!r} does not exist or is not a folder")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"no config.json in {model_dir!r}; expected a Hugging Face model folder "
            "(config.json, *.safetensors and tokenizer files)"
        )
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from e
    architectures = raw.get("architectures") or []
    if not architectures:
        raise ValueError(
            f"{config_path} has no 'architectures' entry; supported: {supported_architectures()}"
        )
    try:
        get_model_class(architectures[0])
    except ValueError as e:
        raise ValueError(f"{model_dir}: {e}") from e

    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(str(path))
    except Exception as e:  # transformers validates configs with several error types
        raise ValueError(f"{config_path} cannot be served: {e}") from e
    check_servable(hf_config, str(path))
    checkpoint_files(str(path))
    return hf_config


def check_servable(hf_config: Any, where: str = "config") -> None:
    """Raise ValueError naming the first field that makes this config unservable."""
    for name in _POSITIVE_INT_FIELDS:
        value = getattr(hf_config, name, None)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: {name} must be a positive integer, got {value!r}")
    heads, kv_heads = hf_config.num_attention_heads, num_kv_heads_of(hf_config)
    if not getattr(hf_config, "head_dim", None) and hf_config.hidden_size % heads:
        raise ValueError(
            f"{where}: hidden_size={hf_config.hidden_size} is not divisible by "
            f"num_attention_heads={heads} and the config sets no head_dim"
        )
    head_dim = head_dim_of(hf_config)
    if head_dim % 2:
        raise ValueError(f"{where}: head_dim={head_dim} must be even for rotary embeddings")
    if heads % kv_heads:
        raise ValueError(
            f"{where}: num_attention_heads={heads} is not a multiple of "
            f"num_key_value_heads={kv_heads}"
        )
    act = getattr(hf_config, "hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise ValueError(
            f"{where}: unsupported hidden_act {act!r}; supported: {ACTIVATIONS.names()}"
        )
    try:
        check_rope_parameters(rope_parameters(hf_config))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e


def checkpoint_files(model_dir: str) -> list[Path]:
    """The safetensors files holding the weights: the shards named by the index, or every
    *.safetensors file of an unsharded folder."""
    path = Path(model_dir)
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index: {e!r}") from e
        names = sorted(set(weight_map.values()))
        missing = [name for name in names if not (path / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shard files that do not exist: {missing}")
        return [path / name for name in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        hint = f" (found {others}; re-save them with safe_serialization=True)" if others else ""
        raise FileNotFoundError(
            f"no *.safetensors weights in {model_dir!r}; kestrel loads safetensors only{hint}"
        )
    return files


def kv_cache_shape_info(hf_config: Any) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of the per-layer KV caches this model needs."""
    return hf_config.num_hidden_layers, num_kv_heads_of(hf_config), head_dim_of(hf_config)


def load_model(
    model_dir: str, hf_config: Any, dtype: torch.dtype, device: torch.device
) -> nn.Module:
    """Build the model for `hf_config` directly on `device` in `dtype` and load its weights."""
    model_cls = get_model_class((hf_config.architectures or [""])[0])
    check_servable(hf_config, model_dir)
    with _default_dtype(dtype), torch.device(device):
        model = model_cls(hf_config)
    load_weights(model, checkpoint_files(model_dir))
    return model.eval()


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_weights(model: nn.Module, files: list[Path]) -> None:
    """Copy every checkpoint tensor into its parameter; raise if any is unknown, misshapen or
    missing. Each parameter loads itself through its `weight_loader`."""
    params, required = _required_loads(model)
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    mapping: dict[str, tuple[str, str | int]] = getattr(model, "packed_modules_mapping", {})
    loaded: dict[str, set[str | int | None]] = {name: set() for name in params}
    unexpected: list[str] = []
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for ckpt_name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if ckpt_name.endswith(".inv_freq") or (tied and ckpt_name == "lm_head.weight"):
                    continue  # RoPE tables are recomputed; a tied head is the embedding
                name, shard = _map_name(ckpt_name, mapping)
                if name not in params:
                    unexpected.append(ckpt_name)
                    continue
                param = params[name]
                try:
                    param.weight_loader(param, f.get_tensor(ckpt_name), shard)  # type: ignore[attr-defined]
                except ValueError as e:
                    raise ValueError(f"{file.name}: weight {ckpt_name!r}: {e}") from e
                loaded[name].add(shard)
    if unexpected:
        raise ValueError(
            f"checkpoint has {len(unexpected)} weights this model does not use, e.g. "
            f"{unexpected[:5]}; is config.json's architecture right?"
        )
    missing = [
        f"{name}[{shard}]" if shard is not None else name
        for name, shards in required.items()
        if None not in loaded[name]
        for shard in sorted(shards - loaded[name], key=str)
    ]
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} weights, e.g. {missing[:5]}")


def _map_name(ckpt_name: str, mapping: dict[str, tuple[str, str | int]]) -> tuple[str, Any]:
    for fragment, (merged, shard) in mapping.items():
        if f".{fragment}." in ckpt_name:
            return ckpt_name.replace(f".{fragment}.", f".{merged}."), shard
    return ckpt_name, None


def _required_loads(
    model: nn.Module,
) -> tuple[dict[str, nn.Parameter], dict[str, set[str | int | None]]]:
    """Parameters by name (a shared parameter appears once, under its first name) and the
    shards each must receive: every shard of a packed layer, else the whole tensor (None)."""
    params: dict[str, nn.Parameter] = {}
    required: dict[str, set[str | int | None]] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            name = f"{module_name}.{param_name}" if module_name else param_name
            params[name] = param
            shards = module.shard_ids if isinstance(module, LinearBase) else []
            required[name] = set(shards) if shards else {None}
    return params, required
