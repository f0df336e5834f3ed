"""Bad input: a clear ValueError naming the field and the limit, nothing queued or allocated,
and the engine keeps serving everything else."""

from __future__ import annotations

import pytest

from kestrel import Engine, EngineConfig, SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine(EngineConfig.from_kwargs(tiny_model("llama"), dtype="float32",
                                           max_model_len=64))


def _assert_clean(engine: Engine) -> None:
    assert not engine.has_unfinished()
    assert engine.kv.usage == 0.0
    engine.kv.check_integrity()


@pytest.mark.parametrize(
    "prompt, params, match",
    [
        (list(range(3, 70)), None, r"prompt is 67 tokens.*max_model_len is 64"),
        (list(range(3, 13)), dict(max_tokens=60), r"max_tokens=60.*max_tokens <= 54"),
        ("", None, r"prompt must not be empty"),
        ([], None, r"prompt must contain at least one token"),
        ([3, -1], None, r"prompt_token_ids contains -1.*\[0, \d+\)"),
        ([3, 10**6], None, r"prompt_token_ids contains 1000000"),
        ([3, 4], dict(stop_token_ids=[10**6]), r"stop_token_ids contains 1000000"),
        ([3, 4], dict(logit_bias={10**6: 1.0}), r"logit_bias contains 1000000"),
        ([3, "a"], None, r"prompt must be a string or a list of integer token ids"),
    ],
)
def test_model_dependent_errors(engine, prompt, params, match):
    sp = SamplingParams(**params) if params else SamplingParams()
    with pytest.raises(ValueError, match=match):
        engine.add_request("bad", prompt, sp)
    _assert_clean(engine)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("temperature", -0.1, r"temperature must be >= 0"),
        ("top_p", 0.0, r"top_p must be in \(0, 1\]"),
        ("top_p", 1.5, r"top_p must be in \(0, 1\]"),
        ("top_k", 0, r"top_k must be -1 \(disabled\) or >= 1"),
        ("top_k", -2, r"top_k must be -1"),
        ("n", 0, r"n must be an integer >= 1"),
        ("max_tokens", 0, r"max_tokens must be an integer >= 1"),
        ("stop", 5, r"stop must be"),
        ("stop", [1, 2], r"stop must be"),
    ],
)
def test_sampling_param_errors_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**{field: value})


def test_bad_request_does_not_disturb_running_ones(engine):
    good = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    engine.add_request("good", [5, 6, 7, 8], good)
    engine.step()
    with pytest.raises(ValueError):
        engine.add_request("bad", list(range(3, 80)), good)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("good", [5, 6], good)
    finals = []
    while engine.has_unfinished():
        finals += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in finals] == ["good"]
    assert len(finals[0].outputs[0].token_ids) == 8
    _assert_clean(engine)
