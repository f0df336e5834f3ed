"""Benchmark workloads: seeded synthetic prompts and a JSONL loader.

Owns turning a dataset description into a list of `BenchRequest`s. Everything is a pure
function of its arguments and seed. Must not send requests.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Common short English words: most tokenizers spend about one token on each (with its space),
# so a prompt of N words is close to N tokens without needing the model's tokenizer.
_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from "
    "or one had by word but not what all were we when your can said there use an each which she "
    "do how their if will up other about out many then them these so some her would make like "
    "him into time has look two more write go see number no way could people my than first "
    "water been call who oil its now find long down day did get come made may part over new "
    "sound take only little work know place year live me back give most very after thing our "
    "just name good sentence man think say great where help through much before line right too "
    "mean old any same tell boy follow came want show also around form three small set put end "
    "does another well large must big even such because turn here why ask went men read need "
    "land different home us move try kind hand picture again change off play spell air away"
).split()


@dataclass
class BenchRequest:
    prompt: str | None  # text prompt (completions) ...
    messages: list[dict[str, Any]] | None  # ... or a conversation (chat)
    prompt_len: int  # prompt length in tokens (exact with a tokenizer, else estimated)
    output_len: int  # max_tokens to ask for


def _lengths(rng: random.Random, mean: int, range_ratio: float) -> int:
    lo = max(1, int(mean * (1 - range_ratio)))
    hi = max(lo, int(mean * (1 + range_ratio)))
    return rng.randint(lo, hi)


def random_requests(
    num: int,
    input_len: int,
    output_len: int,
    *,
    range_ratio: float = 0.0,
    seed: int = 0,
    tokenizer: Any = None,
    prefix_len: int = 0,
) -> list[BenchRequest]:
    """`num` prompts of about `input_len` tokens (uniform in input_len * [1 - r, 1 + r]) and
    output lengths likewise. A shared `prefix_len`-token prefix exercises prefix caching.

    With a tokenizer, prompts are decoded random token ids, so their token counts are exact
    up to re-tokenization at piece boundaries; without one they are random common words.
    """
    if num < 1 or input_len < 1 or output_len < 1:
        raise ValueError("num, input_len and output_len must be >= 1")
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}")
    rng = random.Random(seed)
    make = _token_text(tokenizer) if tokenizer is not None else _word_text
    prefix = make(rng, prefix_len) if prefix_len > 0 else ""
    out = []
    for _ in range(num):
        n_in, n_out = _lengths(rng, input_len, range_ratio), _lengths(rng, output_len,
                                                                      range_ratio)
        text = prefix + make(rng, n_in)
        length = len(tokenizer(text, add_special_tokens=False).input_ids) if tokenizer else (
            prefix_len + n_in)
        out.append(BenchRequest(prompt=text, messages=None, prompt_len=length, output_len=n_out))
    return out


def _word_text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n)) + " "


def _token_text(tokenizer: Any):
    # Only ids that decode to whole characters on their own: a lone byte-level piece would
    # decode to U+FFFD and re-encode as several tokens.
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    vocab = [i for i in range(len(tokenizer))
             if i not in special and "\ufffd" not in tokenizer.decode([i])]

    def make(rng: random.Random, n: int) -> str:
        text = tokenizer.decode([rng.choice(vocab) for _ in range(n)])
        ids = tokenizer(text, add_special_tokens=False).input_ids
        return tokenizer.decode(ids[:n]) if len(ids) > n else text

    return make


def load_jsonl(path: str | Path, *, output_len: int = 128, num: int | None = None,
               seed: int = 0, shuffle: bool = False) -> list[BenchRequest]:
    """One request per line: {"prompt": str} or {"messages": [...]}, optionally with
    "max_tokens" (or "output_len") and "prompt_len"; other keys are ignored."""
    rows: list[BenchRequest] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not JSON: {exc}") from exc
            if not isinstance(item, dict) or not (
                isinstance(item.get("prompt"), str) or isinstance(item.get("messages"), list)
            ):
                raise ValueError(f"{path}:{lineno}: expected an object with 'prompt' (string) "
                                 "or 'messages' (list)")
            out_len = int(item.get("max_tokens") or item.get("output_len") or output_len)
            text = item.get("prompt")
            est = item.get("prompt_len") or len((text or json.dumps(item["messages"])).split())
            rows.append(BenchRequest(prompt=text, messages=item.get("messages"),
                                     prompt_len=int(est), output_len=out_len))
    if not rows:
        raise ValueError(f"{path}: no requests")
    if shuffle:
        random.Random(seed).shuffle(rows)
    if num is not None:
        rows = (rows * (num // len(rows) + 1))[:num]
    return rows


def to_messages(request: BenchRequest) -> list[dict[str, Any]]:
    """The conversation to send to a chat endpoint."""
    if request.messages is not None:
        return request.messages
    return [{"role": "user", "content": request.prompt or ""}]
