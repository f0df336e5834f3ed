"""SamplingParams validation: every rule raises a ValueError that names its field, and the
edges of every valid range are accepted."""

from __future__ import annotations

import math
import re

import pytest

from kestrel.sampling_params import SamplingParams

INVALID = [
    ("n", 0),
    ("n", -1),
    ("n", 1.5),
    ("n", True),
    ("temperature", -0.1),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("temperature", "1"),
    ("top_p", 0.0),
    ("top_p", -0.5),
    ("top_p", 1.01),
    ("top_p", math.nan),
    ("top_k", 0),
    ("top_k", -2),
    ("top_k", 2.0),
    ("min_p", -0.01),
    ("min_p", 1.5),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", math.inf),
    ("frequency_penalty", 2.01),
    ("frequency_penalty", -2.5),
    ("presence_penalty", 2.5),
    ("presence_penalty", -2.01),
    ("presence_penalty", None),
    ("max_tokens", 0),
    ("max_tokens", -3),
    ("max_tokens", 1.0),
    ("min_tokens", -1),
    ("min_tokens", 17),  # > the default max_tokens=16
    ("stop", 5),
    ("stop", [1]),
    ("stop", ["ok", 2]),
    ("stop", ""),
    ("stop", ["ok", ""]),
    ("stop", {"a"}),
    ("stop_token_ids", 5),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", ["2"]),
    ("logprobs", -1),
    ("logprobs", 21),
    ("logprobs", 1.0),
    ("logprobs", True),
    ("prompt_logprobs", -1),
    ("prompt_logprobs", 21),
    ("logit_bias", {1: 100.5}),
    ("logit_bias", {1: -101}),
    ("logit_bias", {1: math.nan}),
    ("logit_bias", {1: "5"}),
    ("logit_bias", {-1: 1.0}),
    ("logit_bias", {"12": 1.0}),
    ("logit_bias", [(1, 1.0)]),
    ("seed", 1.5),
    ("seed", "42"),
]


@pytest.mark.parametrize(("name", "value"), INVALID)
def test_invalid_value_raises_naming_the_field(name: str, value):
    with pytest.raises(ValueError, match=rf"^{re.escape(name)} "):
        SamplingParams(**{name: value})


VALID = [
    ("n", 1),
    ("n", 8),
    ("temperature", 0.0),
    ("temperature", 0),
    ("temperature", 2.5),
    ("top_p", 1.0),
    ("top_p", 1e-6),
    ("top_k", -1),
    ("top_k", 1),
    ("top_k", 50),
    ("min_p", 0.0),
    ("min_p", 1.0),
    ("repetition_penalty", 0.5),
    ("repetition_penalty", 1.3),
    ("frequency_penalty", -2.0),
    ("frequency_penalty", 2.0),
    ("presence_penalty", -2),
    ("presence_penalty", 2),
    ("max_tokens", 1),
    ("max_tokens", None),
    ("min_tokens", 0),
    ("min_tokens", 16),
    ("stop", None),
    ("stop", "###"),
    ("stop", ["a", "bc"]),
    ("stop", ("x",)),
    ("stop_token_ids", None),
    ("stop_token_ids", [0, 7]),
    ("stop_token_ids", (3,)),
    ("logprobs", None),
    ("logprobs", 0),
    ("logprobs", 20),
    ("prompt_logprobs", 0),
    ("prompt_logprobs", 20),
    ("logit_bias", None),
    ("logit_bias", {}),
    ("logit_bias", {0: -100, 5: 100.0, 9: 0.5}),
    ("seed", None),
    ("seed", 0),
    ("seed", -7),
    ("seed", 2**70),
]


@pytest.mark.parametrize(("name", "value"), VALID)
def test_valid_value_is_accepted(name: str, value):
    SamplingParams(**{name: value})


def test_defaults():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, -1, 0.0)
    assert (p.repetition_penalty, p.frequency_penalty, p.presence_penalty) == (1.0, 0.0, 0.0)
    assert (p.max_tokens, p.min_tokens, p.logprobs, p.prompt_logprobs) == (16, 0, None, None)
    assert p.stop == [] and p.stop_token_ids == [] and p.logit_bias is None and p.seed is None
    assert p.skip_special_tokens and p.spaces_between_special_tokens
    assert not p.include_stop_str_in_output and not p.ignore_eos and not p.greedy


def test_stop_is_normalized_to_a_list():
    assert SamplingParams(stop="END").stop == ["END"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=(4, 5)).stop_token_ids == [4, 5]


def test_min_tokens_is_checked_against_max_tokens():
    SamplingParams(max_tokens=4, min_tokens=4)
    SamplingParams(max_tokens=None, min_tokens=1000)
    with pytest.raises(ValueError, match="^min_tokens .*max_tokens=4"):
        SamplingParams(max_tokens=4, min_tokens=5)


def test_greedy_and_clone():
    assert SamplingParams(temperature=0.0).greedy
    assert not SamplingParams(temperature=0.01).greedy
    base = SamplingParams(temperature=0.7, stop="x", seed=3)
    child = base.clone(seed=4)
    assert child.seed == 4 and child.temperature == 0.7 and child.stop == ["x"]
    assert base.seed == 3
    with pytest.raises(ValueError, match="^top_p "):
        base.clone(top_p=0.0)
