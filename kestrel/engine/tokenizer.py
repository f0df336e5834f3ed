"""Tokenizer loading, chat templates and end-of-sequence ids, all through transformers.

Owns: turning a model folder into a tokenizer, its eos ids and optional sampling defaults
from generation_config.json. Must not know about requests or scheduling.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
# generation_config.json keys that map onto SamplingParams fields.
_SAMPLING_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    if not any(os.path.exists(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"no tokenizer in {path!r}: expected one of {list(_TOKENIZER_FILES)}"
        )
    return AutoTokenizer.from_pretrained(path)


def _generation_config(model_dir: str) -> GenerationConfig | None:
    if not os.path.exists(os.path.join(model_dir, "generation_config.json")):
        return None
    return GenerationConfig.from_pretrained(model_dir)


def eos_token_ids(model_dir: str, tokenizer: PreTrainedTokenizerBase, hf_config: Any) -> list[int]:
    """eos ids from generation_config.json, the tokenizer and config.json, in that order."""
    ids: list[int] = []
    gen = _generation_config(model_dir)
    for source in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id,
                   getattr(hf_config, "eos_token_id", None)):
        for tok in source if isinstance(source, (list, tuple)) else [source]:
            if tok is not None and tok not in ids:
                ids.append(int(tok))
    return ids


def generation_defaults(model_dir: str) -> dict[str, Any]:
    """Sampling defaults the model's authors recommend (used only when asked for)."""
    gen = _generation_config(model_dir)
    if gen is None:
        return {}
    diff = gen.to_diff_dict()
    out = {dst: diff[src] for src, dst in _SAMPLING_KEYS.items() if diff.get(src) is not None}
    if "top_k" in out and out["top_k"] == 0:
        out["top_k"] = -1
    return out


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    chat_template: str | None = None,
    **template_kwargs: Any,
) -> str:
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat_template; pass chat_template explicitly")
    try:
        return tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            chat_template=chat_template,
            **template_kwargs,
        )
    except Exception as exc:  # jinja errors, bad message shapes
        raise ValueError(f"messages could not be rendered with the chat template: {exc}") from exc
