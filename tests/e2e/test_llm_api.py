"""The offline LLM API, the streaming Engine API and the CLI on a tiny model."""

from __future__ import annotations

import pytest

from kestrel import LLM, Engine, EngineConfig, SamplingParams
from kestrel.entrypoints.cli import main as cli_main

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def path(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def llm(path):
    return LLM(path, dtype="float32")


def test_generate_keeps_input_order_and_accepts_strings_and_ids(llm):
    tok = llm.get_tokenizer()
    texts = ["def add(a, b):", "the quick brown fox", "x"]
    params = [GREEDY.clone(max_tokens=m) for m in (3, 9, 5)]
    outs = llm.generate(texts, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 9, 5]
    assert [o.prompt for o in outs] == texts
    by_ids = llm.generate([tok(t).input_ids for t in texts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in by_ids] == [o.outputs[0].token_ids for o in outs]
    single = llm.generate(texts[1], params[1], use_tqdm=False)
    assert single[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
    with pytest.raises(ValueError, match="sampling_params has 2 entries but there are 3"):
        llm.generate(texts, params[:2], use_tqdm=False)


def test_text_is_the_decoded_tokens(llm):
    out = llm.generate(["hello there"], GREEDY, use_tqdm=False)[0].outputs[0]
    tok = llm.get_tokenizer()
    assert out.text == tok.decode(out.token_ids, skip_special_tokens=True)


def test_stop_strings_trim_or_keep(llm):
    base = llm.generate(["hello there"], GREEDY.clone(max_tokens=24), use_tqdm=False)[0]
    text = base.outputs[0].text
    stop = next(text[i : i + 3] for i in range(4, len(text) - 3) if text[i : i + 3].strip())
    cut = text.index(stop)
    trimmed = llm.generate(["hello there"], GREEDY.clone(max_tokens=24, stop=[stop]),
                           use_tqdm=False)[0].outputs[0]
    assert trimmed.text == text[:cut]
    assert trimmed.finish_reason == "stop" and trimmed.stop_reason == stop
    kept = llm.generate(["hello there"], GREEDY.clone(max_tokens=24, stop=stop,
                                                       include_stop_str_in_output=True),
                        use_tqdm=False)[0].outputs[0]
    assert kept.text == text[: cut + len(stop)]
    assert llm.engine.kv.usage == 0.0


def test_eos_and_stop_token_ids_finish_with_stop(llm):
    base = llm.generate(["abc"], GREEDY, use_tqdm=False)[0].outputs[0]
    stop_tok = base.token_ids[5]
    out = llm.generate(["abc"], GREEDY.clone(stop_token_ids=[stop_tok]), use_tqdm=False)[0]
    comp = out.outputs[0]
    first = base.token_ids.index(stop_tok)
    assert comp.token_ids == base.token_ids[: first + 1]
    assert comp.finish_reason == "stop" and comp.stop_reason == stop_tok


def test_chat_applies_the_template(llm):
    tok = llm.get_tokenizer()
    conv = [{"role": "user", "content": "hi there"}]
    out = llm.chat(conv, GREEDY, use_tqdm=False)[0]
    rendered = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert out.prompt_token_ids == tok(rendered, add_special_tokens=False).input_ids
    two = llm.chat([conv, conv], GREEDY, use_tqdm=False)
    assert two[0].outputs[0].token_ids == two[1].outputs[0].token_ids == out.outputs[0].token_ids


@pytest.mark.parametrize("mode", ["off", "on"])
def test_engine_streams_incrementally_and_abort_frees_blocks(path, mode):
    engine = Engine(EngineConfig.from_kwargs(path, dtype="float32", async_scheduling=mode))
    engine.add_request("a", "stream me", GREEDY.clone(max_tokens=6))
    engine.add_request("b", "abort me", GREEDY.clone(max_tokens=50))
    seen = {"a": [], "b": []}
    deltas = []
    aborted = False
    while engine.has_unfinished():
        for out in engine.step():
            seen[out.request_id].append(len(out.outputs[0].token_ids))
            if out.request_id == "a":
                deltas.append(out.outputs[0].delta_text)
                final_a = out
        if len(seen["b"]) == 3 and not aborted:
            assert engine.abort("b")
            assert not engine.abort("b")
            aborted = True
    assert seen["a"] == [1, 2, 3, 4, 5, 6] and final_a.finished
    assert "".join(deltas) == final_a.outputs[0].text
    assert seen["b"] == [1, 2, 3]
    assert engine.kv.usage == 0.0 and engine.scheduler.num_running == 0


def test_cli_generate_prints_completions(path, capsys):
    code = cli_main(["generate", "--model", path, "--dtype", "float32", "--max-tokens", "4",
                     "--temperature", "0", "--no-progress", "hello", "world"])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.count("----- prompt") == 2 and "hello" in printed and "world" in printed


def test_cli_reports_bad_input(path, capsys):
    code = cli_main(["generate", "--model", path, "--top-p", "2", "--no-progress", "x"])
    assert code == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err


def test_cli_help_lists_every_option():
    with pytest.raises(SystemExit):
        cli_main(["generate", "--help"])


def test_abort_with_a_step_in_flight_loses_nothing(path):
    engine = Engine(EngineConfig.from_kwargs(path, dtype="float32", async_scheduling="on",
                                             max_num_batched_tokens=8))
    engine.add_request("gone", list(range(3, 40)), SamplingParams(max_tokens=5, prompt_logprobs=1))
    engine.add_request("kept", list(range(3, 12)), GREEDY.clone(max_tokens=5))
    engine.step()  # launches the first chunk; its prompt logprobs are still in flight
    assert engine.abort("gone")
    finals = []
    while engine.has_unfinished():
        finals += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in finals] == ["kept"]
    assert engine.kv.usage == 0.0
    engine.kv.check_integrity()
