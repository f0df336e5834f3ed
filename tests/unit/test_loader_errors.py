"""Loader errors name what is wrong (and what is supported); tolerated checkpoint quirks load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kestrel.models.dummy import save_random_model
from kestrel.models.loader import kv_cache_shape_info, load_hf_config, load_model
from kestrel.utils.registry import Registry

CPU = torch.device("cpu")
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(save_random_model(tmp_path_factory.mktemp("llama"), "llama"))


@pytest.fixture
def model_dir(pristine: Path, tmp_path: Path) -> Path:
    """A private, editable copy of a valid tiny Llama folder."""
    return Path(shutil.copytree(pristine, tmp_path / "model"))


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _edit_weights(folder: Path, edit) -> None:
    tensors = load_file(folder / WEIGHTS)
    edit(tensors)
    save_file(tensors, folder / WEIGHTS)


def _load(folder: Path) -> torch.nn.Module:
    return load_model(str(folder), load_hf_config(str(folder)), torch.float32, CPU)


# -- load_hf_config ---------------------------------------------------------------------------


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf_config(str(tmp_path / "nope"))


def test_missing_config_json(model_dir: Path) -> None:
    (model_dir / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf_config(str(model_dir))


def test_invalid_json(model_dir: Path) -> None:
    (model_dir / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_hf_config(str(model_dir))


def test_unsupported_architecture_lists_supported(model_dir: Path) -> None:
    _edit_config(model_dir, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'") as e:
        load_hf_config(str(model_dir))
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert arch in str(e.value)


def test_missing_architectures_entry(model_dir: Path) -> None:
    _edit_config(model_dir, architectures=None)
    with pytest.raises(ValueError, match="no 'architectures' entry.*LlamaForCausalLM"):
        load_hf_config(str(model_dir))


def test_no_safetensors(model_dir: Path) -> None:
    (model_dir / WEIGHTS).rename(model_dir / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors.*pytorch_model\.bin"):
        load_hf_config(str(model_dir))


def test_index_names_missing_shard(model_dir: Path) -> None:
    names = list(load_file(model_dir / WEIGHTS))
    weight_map = {name: "model-00001-of-00002.safetensors" for name in names}
    weight_map[names[-1]] = "model-00002-of-00002.safetensors"
    (model_dir / WEIGHTS).rename(model_dir / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": weight_map}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_hf_config(str(model_dir))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"hidden_size": 66, "head_dim": None}, "(?s)hidden.*(multiple|divisible)"),
        ({"num_key_value_heads": 3}, "num_key_value_heads=3"),
        ({"hidden_act": "relu"}, "unsupported hidden_act 'relu'; supported"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        (
            {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
            "unsupported rope_type 'yarn'; supported",
        ),
    ],
    ids=["hidden-not-divisible", "gqa-groups", "activation", "no-layers", "rope-type"],
)
def test_unservable_config(model_dir: Path, changes: dict, message: str) -> None:
    _edit_config(model_dir, **changes)
    with pytest.raises(ValueError, match=message):
        load_hf_config(str(model_dir))


# -- load_model -------------------------------------------------------------------------------


def test_missing_weight(model_dir: Path) -> None:
    _edit_weights(model_dir, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=r"missing 1 weights.*layers\.1\.self_attn\.qkv_proj"):
        _load(model_dir)


def test_untied_model_without_lm_head(model_dir: Path) -> None:
    _edit_weights(model_dir, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ValueError, match="missing 1 weights.*lm_head.weight"):
        _load(model_dir)


def test_shape_mismatch_names_the_weight(model_dir: Path) -> None:
    def shrink(tensors: dict) -> None:
        name = "model.layers.0.mlp.down_proj.weight"
        tensors[name] = tensors[name][:, :-1].contiguous()

    _edit_weights(model_dir, shrink)
    with pytest.raises(ValueError, match="down_proj.weight.*shape mismatch"):
        _load(model_dir)


def test_unexpected_weight(model_dir: Path) -> None:
    _edit_weights(model_dir, lambda t: t.update({"model.layers.0.extra.weight": torch.ones(2)}))
    with pytest.raises(ValueError, match="does not use.*layers.0.extra.weight"):
        _load(model_dir)


def test_tolerated_checkpoint_variants(pristine: Path, model_dir: Path) -> None:
    reference = _load(pristine)

    def variant(tensors: dict) -> None:
        # inv_freq buffers saved by old transformers, bf16 storage and a pre-merged gate_up_proj
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
        prefix = "model.layers.1.mlp."
        gate, up = tensors.pop(prefix + "gate_proj.weight"), tensors.pop(prefix + "up_proj.weight")
        tensors[prefix + "gate_up_proj.weight"] = torch.cat([gate, up])
        tensors["model.norm.weight"] = tensors["model.norm.weight"].bfloat16()

    _edit_weights(model_dir, variant)
    model = _load(model_dir)
    expected = reference.state_dict()
    for name, value in model.state_dict().items():
        tol = 1e-2 if name == "model.norm.weight" else 0.0
        torch.testing.assert_close(value, expected[name], rtol=tol, atol=tol)


def test_kv_cache_shape_info(tmp_path: Path) -> None:
    qwen3 = load_hf_config(save_random_model(tmp_path / "q3", "qwen3"))
    assert kv_cache_shape_info(qwen3) == (2, 2, 32)
    mistral = load_hf_config(save_random_model(tmp_path / "m", "mistral", num_hidden_layers=3))
    assert kv_cache_shape_info(mistral) == (3, 1, 16)


def test_registry_error_and_lazy_import() -> None:
    reg: Registry[type] = Registry("widget")
    reg.register("ordered", "collections:OrderedDict")
    reg.register("direct", dict)
    assert reg.get("ordered").__name__ == "OrderedDict" and reg.get("direct") is dict
    supported = r"unsupported widget 'nope'; supported: \['direct', 'ordered'\]"
    with pytest.raises(ValueError, match=supported):
        reg.get("nope")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("direct", list)
