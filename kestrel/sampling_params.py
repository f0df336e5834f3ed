"""User-facing `SamplingParams` and their validation.

Owns: the fields users set per request and every check that needs no model (ranges, types).
Checks that need the model (vocabulary size, context length) live in the engine's input
processing. Every error is a ValueError naming the field and the limit.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

_GREEDY_EPS = 1e-5


@dataclass
class SamplingParams:
    n: int = 1  # parallel samples for one prompt (they share the prompt's KV blocks)
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # in (0, 1]
    top_k: int = -1  # -1 = all tokens
    min_p: float = 0.0  # in [0, 1]; drop tokens with p < min_p * p_max
    repetition_penalty: float = 1.0  # > 0; HF/CTRL style, over prompt and output tokens
    frequency_penalty: float = 0.0  # [-2, 2]; OpenAI style, over output tokens
    presence_penalty: float = 0.0  # [-2, 2]; OpenAI style, over output tokens
    logit_bias: dict[int, float] | None = None  # token id -> added to the logit, [-100, 100]
    seed: int | None = None  # per-request generator: same output whatever the batch
    max_tokens: int | None = 16  # None = up to the context length
    min_tokens: int = 0  # stop tokens are masked until this many outputs exist
    stop: str | list[str] | None = None  # stop strings, matched on the detokenized text
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # chosen token + this many top tokens per output position
    prompt_logprobs: int | None = None  # prompt token + this many top tokens per prompt position
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # reserved for later features

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        elif isinstance(self.stop, (list, tuple)):
            self.stop = list(self.stop)
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif isinstance(self.stop_token_ids, (list, tuple)):
            self.stop_token_ids = list(self.stop_token_ids)
        self._validate()

    def _validate(self) -> None:
        _check(_is_int(self.n) and self.n >= 1, "n", f"must be an integer >= 1, got {self.n!r}")
        _check(
            _is_num(self.temperature) and self.temperature >= 0,
            "temperature",
            f"must be >= 0, got {self.temperature!r}",
        )
        _check(
            _is_num(self.top_p) and 0 < self.top_p <= 1,
            "top_p",
            f"must be in (0, 1], got {self.top_p!r}",
        )
        _check(
            _is_int(self.top_k) and (self.top_k == -1 or self.top_k >= 1),
            "top_k",
            f"must be -1 (disabled) or >= 1, got {self.top_k!r}",
        )
        _check(
            _is_num(self.min_p) and 0 <= self.min_p <= 1,
            "min_p",
            f"must be in [0, 1], got {self.min_p!r}",
        )
        _check(
            _is_num(self.repetition_penalty) and self.repetition_penalty > 0,
            "repetition_penalty",
            f"must be > 0, got {self.repetition_penalty!r}",
        )
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            _check(_is_num(value) and -2 <= value <= 2, name, f"must be in [-2, 2], got {value!r}")
        _check(
            self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
            "max_tokens",
            f"must be an integer >= 1 or None, got {self.max_tokens!r}",
        )
        _check(
            _is_int(self.min_tokens) and self.min_tokens >= 0,
            "min_tokens",
            f"must be an integer >= 0, got {self.min_tokens!r}",
        )
        if self.max_tokens is not None and _is_int(self.min_tokens):
            _check(
                self.min_tokens <= self.max_tokens,
                "min_tokens",
                f"must be <= max_tokens={self.max_tokens}, got {self.min_tokens}",
            )
        _check(
            isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop),
            "stop",
            f"must be a non-empty string or a list of non-empty strings, got {self.stop!r}",
        )
        _check(
            isinstance(self.stop_token_ids, list)
            and all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids",
            f"must be a list of token ids >= 0, got {self.stop_token_ids!r}",
        )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(
                value is None or (_is_int(value) and 0 <= value <= 20),
                name,
                f"must be None or an integer in [0, 20], got {value!r}",
            )
        if self.logit_bias is not None:
            _check(isinstance(self.logit_bias, dict), "logit_bias", "must be a dict")
            for tok, bias in self.logit_bias.items():
                _check(_is_int(tok) and tok >= 0, "logit_bias", f"key {tok!r} is not a token id")
                _check(
                    _is_num(bias) and -100 <= bias <= 100,
                    "logit_bias",
                    f"value for token {tok} must be in [-100, 100], got {bias!r}",
                )
        _check(
            self.seed is None or _is_int(self.seed),
            "seed",
            f"must be an integer or None, got {self.seed!r}",
        )

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    def clone(self, **changes: Any) -> SamplingParams:
        return dataclasses.replace(self, **changes)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{name} {message}")
