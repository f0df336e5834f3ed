"""Delta outputs on the server path: a lagging stream merges queued deltas, and the
Accumulator rebuilds the whole output a non-streaming response needs."""

from __future__ import annotations

from kestrel.engine.async_engine import _merge
from kestrel.entrypoints.openai.serving_base import Accumulator
from kestrel.outputs import CompletionOutput, Logprob, RequestOutput


def _out(tokens: list[int], text: str, finish: str | None = None, index: int = 0,
         logprobs: bool = True) -> RequestOutput:
    lps = [{t: Logprob(-0.5 * t, 1, str(t))} for t in tokens] if logprobs else None
    comp = CompletionOutput(index, text, list(tokens), cumulative_logprob=-float(sum(tokens)),
                            logprobs=lps, finish_reason=finish, delta_text=text)
    return RequestOutput("r", None, [7, 8], [comp], finished=finish is not None)


def test_lagging_delta_stream_concatenates_everything():
    merged = _merge([_out([1], "a"), _out([2, 3], "bc"), _out([4], "d", "length")], delta=True)
    comp = merged.outputs[0]
    assert comp.token_ids == [1, 2, 3, 4]
    assert comp.text == comp.delta_text == "abcd"
    assert [next(iter(lp)) for lp in comp.logprobs] == [1, 2, 3, 4]
    assert merged.finished and comp.finish_reason == "length"


def test_lagging_cumulative_stream_keeps_the_newest_lists():
    items = [_out([1], "a"), _out([1, 2], "ab")]
    for o, delta in zip(items, ["a", "b"], strict=True):
        o.outputs[0].delta_text = delta
    merged = _merge(items, delta=False)
    assert merged.outputs[0].token_ids == [1, 2] and merged.outputs[0].text == "ab"
    assert merged.outputs[0].delta_text == "ab"


def test_accumulator_rebuilds_the_whole_output():
    acc = Accumulator()
    for out in (_out([5], "x"), _out([], ""), _out([6, 9], "yz", "stop")):
        assert not acc.finished
        acc.add(out)
    assert acc.finished
    whole = acc.result()
    comp = whole.outputs[0]
    assert (comp.token_ids, comp.text, comp.finish_reason) == ([5, 6, 9], "xyz", "stop")
    assert [next(iter(lp)) for lp in comp.logprobs] == [5, 6, 9]
    assert comp.cumulative_logprob == -15.0 and whole.prompt_token_ids == [7, 8]


def test_accumulator_without_logprobs_and_several_samples():
    acc = Accumulator()
    acc.add(RequestOutput("r", None, [1], [
        CompletionOutput(0, "a", [3]), CompletionOutput(1, "b", [4])], finished=False))
    acc.add(RequestOutput("r", None, [1], [
        CompletionOutput(0, "c", [5], finish_reason="stop"),
        CompletionOutput(1, "", [], finish_reason="length")], finished=True))
    comps = acc.result().outputs
    assert [(c.index, c.text, c.token_ids, c.logprobs) for c in comps] == [
        (0, "ac", [3, 5], None), (1, "b", [4], None)]
