"""Property test of the live server against its own OpenAPI schema (schemathesis): whatever
body, query or header is generated, the answer is never a 5xx, the engine stays alive and
every KV block is free afterwards. Bounded (derandomized, few examples per route, a short
context so no generation is long) to stay well under a minute on two cores."""

from __future__ import annotations

import time
from collections import Counter

import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")
httpx = pytest.importorskip("httpx")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

from kestrel import EngineConfig  # noqa: E402
from kestrel.entrypoints.openai.api_server import (  # noqa: E402
    ServerConfig,
    ServerThread,
    build_server,
)


@pytest.fixture(scope="module")
def live(tiny_model):
    built = build_server(
        EngineConfig.from_kwargs(tiny_model("llama"), dtype="float32", max_model_len=40),
        ServerConfig(served_model_name=["tiny"], max_request_body_bytes=64 << 10),
    )
    thread = ServerThread(built.app).start()
    built.url = thread.url
    yield built
    thread.stop()
    built.engine.shutdown()


def _check(live, case, seen: Counter) -> None:
    response = case.call(base_url=live.url, timeout=30)
    seen[(case.path, response.status_code)] += 1
    assert response.status_code < 500, (case.as_curl_command(), response.text)
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_input_gives_a_server_error(live, mode):
    schema = schemathesis.openapi.from_dict(live.app.openapi())
    generation = GenerationMode.POSITIVE if mode == "positive" else GenerationMode.NEGATIVE
    seen: Counter = Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        if mode == "negative" and not operation.body and operation.method.upper() == "GET":
            continue  # nothing to get wrong on a bodiless GET without parameters

        examples = 60 if operation.method.upper() == "POST" else 10

        @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation))
        def run(case):
            _check(live, case, seen)

        run()
    # The generated inputs reach both the engine (200) and the validation (400) paths.
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        assert seen[(path, 400)] > 0, seen
        if mode == "positive":
            assert seen[(path, 200)] > 0, seen


def _sampling_fields(vocab: int) -> dict:
    """Every sampling field over its whole accepted range, extremes included."""
    return {
        "temperature": st.floats(0, 1e6),
        "top_p": st.floats(1e-9, 1, exclude_min=False),
        "top_k": st.one_of(st.just(-1), st.integers(1, 10**9)),
        "min_p": st.floats(0, 1),
        "repetition_penalty": st.floats(1e-30, 1e30),
        "presence_penalty": st.floats(-2, 2),
        "frequency_penalty": st.floats(-2, 2),
        "seed": st.integers(-(2**63), 2**64 - 1),
        "n": st.integers(1, 3),
        "stop": st.lists(st.text(min_size=1, max_size=3), max_size=3),
        "stop_token_ids": st.lists(st.integers(0, vocab - 1), max_size=3),
        "logit_bias": st.dictionaries(st.integers(0, vocab - 1).map(str),
                                      st.floats(-100, 100), max_size=3),
        "min_tokens": st.integers(0, 4),
        "ignore_eos": st.booleans(),
        "skip_special_tokens": st.booleans(),
        "include_stop_str_in_output": st.booleans(),
        "stream": st.booleans(),
        "priority": st.integers(-5, 5),
    }


_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=24) | \
    st.sampled_from(["<s>", "</s>", "<pad>", "a</s>b", "\u00e9\u4e2d\U0001f600"])


def _post(live, route: str, body: dict) -> int:
    with httpx.Client(base_url=live.url, timeout=60) as http:
        resp = http.post(route, json=body)
    assert resp.status_code in (200, 400), (route, body, resp.text)
    if resp.status_code == 400 or not body.get("stream"):
        return resp.status_code
    events = resp.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and '"error"' not in resp.text, resp.text
    return resp.status_code


def test_valid_requests_with_extreme_values_reach_the_engine(live):
    vocab = live.engine.vocab_size
    base = _sampling_fields(vocab)
    completion = st.fixed_dictionaries(
        {"prompt": _TEXT | st.lists(st.integers(0, vocab - 1), min_size=1, max_size=12),
         "max_tokens": st.integers(1, 4)},
        optional={**base, "logprobs": st.integers(0, 20), "echo": st.booleans()})
    message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                     "content": _TEXT})
    chat = st.fixed_dictionaries(
        {"messages": st.lists(message, min_size=1, max_size=3), "max_tokens": st.integers(1, 4)},
        optional={**base, "logprobs": st.just(True), "top_logprobs": st.integers(0, 20)})

    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(body=st.one_of(completion.map(lambda b: ("/v1/completions", b)),
                          chat.map(lambda b: ("/v1/chat/completions", b))))
    def run(body):
        statuses[_post(live, *body)] += 1

    statuses: Counter = Counter()
    run()
    assert statuses[200] > statuses[400], statuses  # mostly generated, not refused


def test_engine_survived_and_freed_everything(live):
    deadline = time.monotonic() + 10
    while True:
        busy, free, total = live.engine.call(
            lambda e: (e.has_unfinished(), e.kv.num_free_blocks, e.kv.num_blocks)).result()
        if not busy and free == total:
            break
        assert time.monotonic() < deadline
        time.sleep(0.02)
    live.engine.call(lambda e: e.kv.check_integrity()).result()
    assert live.engine.is_alive
