"""IncrementalDetokenizer: token-by-token text equals a full decode (byte-level BPE and
SentencePiece-style byte fallback), stop strings, streaming deltas, special tokens.

Tokenizers are built in the test with the `tokenizers` library; nothing is downloaded.
"""

from __future__ import annotations

import functools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from kestrel.engine.detokenizer import IncrementalDetokenizer, decode_token
from kestrel.sampling_params import SamplingParams

CORPUS = [
    "héllo wörld, café naïve résumé — ça va? Ünïcödé façade",
    "日本語のテキストと中文文本，还有한국어 텍스트",
    "emoji 😀🎉👍🏽 and flags 🇫🇷 plus €100 £5 ¥20",
    "the quick brown fox jumps over the lazy dog 0123456789",
    "Hello world! Hello there. Stop here. STOP. The end.",
]
ALPHABET = "abcdefgh xyz.,!?\néüñç€£日本語中文한국😀🎉👍🏽"


@functools.cache
def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|end|>", "<|pad|>"],
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>", pad_token="<|pad|>")


@functools.cache
def byte_fallback_tokenizer() -> PreTrainedTokenizerFast:
    """Llama-2 style: Unigram pieces with "▁" for spaces and <0xNN> tokens for anything else."""
    vocab = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)]
    vocab += [(f"<0x{b:02X}>", -10.0) for b in range(256)]
    vocab += [("\u2581", -2.0)] + [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz.,!?"]
    vocab += [("\u2581hello", -1.0), ("\u2581world", -1.0), ("\u2581stop", -1.0)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def stream(
    tokenizer, ids: list[int], params: SamplingParams | None = None, prompt: list[int] = ()
) -> tuple[IncrementalDetokenizer, str, str | None]:
    """Feed ids one at a time, collecting get_delta(); returns (detok, streamed, stop)."""
    detok = IncrementalDetokenizer(tokenizer, list(prompt), params or SamplingParams())
    streamed = ""
    stop = None
    for tok in ids:
        stop = detok.update([tok])
        streamed += detok.get_delta(finished=stop is not None)
        # What was streamed is never taken back.
        assert detok.output_text.startswith(streamed)
        if stop is not None:
            break
    else:
        streamed += detok.get_delta(finished=True)
    assert streamed == detok.output_text
    return detok, streamed, stop


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(st.text(alphabet=ALPHABET, max_size=40))
def test_byte_level_matches_full_decode(text: str):
    tokenizer = byte_level_tokenizer()
    ids = tokenizer.encode(text)
    _, streamed, _ = stream(tokenizer, ids)
    assert streamed == tokenizer.decode(ids) == text


@SETTINGS
@given(st.text(alphabet=ALPHABET, max_size=20), st.text(alphabet=ALPHABET, max_size=30))
def test_byte_level_with_prompt_context(prompt: str, text: str):
    tokenizer = byte_level_tokenizer()
    prompt_ids, ids = tokenizer.encode(prompt), tokenizer.encode(text)
    _, streamed, _ = stream(tokenizer, ids, prompt=prompt_ids)
    assert streamed == tokenizer.decode(ids)


@SETTINGS
@given(st.lists(st.integers(0, 399), max_size=30))
def test_byte_level_random_ids_including_invalid_utf8(ids: list[int]):
    """Arbitrary ids (lone continuation bytes, cut characters, special tokens) still give
    exactly the full decode once finished."""
    tokenizer = byte_level_tokenizer()
    _, streamed, _ = stream(tokenizer, ids)
    assert streamed == tokenizer.decode(ids, skip_special_tokens=True)


def test_multibyte_char_is_held_until_complete():
    tokenizer = byte_fallback_tokenizer()
    ids = tokenizer.encode("hello €")
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert pieces[-3:] == ["<0xE2>", "<0x82>", "<0xAC>"]
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    deltas = []
    for tok in ids:
        detok.update([tok])
        deltas.append(detok.get_delta(finished=False))
        assert "\ufffd" not in detok.output_text
    assert deltas[-3:] == ["", "", "€"]
    assert detok.output_text == "hello €"


@SETTINGS
@given(st.text(alphabet="helowrdst !?.€日😀é", max_size=40))
def test_byte_fallback_matches_full_decode(text: str):
    tokenizer = byte_fallback_tokenizer()
    ids = tokenizer.encode(text)
    _, streamed, _ = stream(tokenizer, ids)
    assert streamed == tokenizer.decode(ids)


def test_sentencepiece_leading_space_after_prompt():
    tokenizer = byte_fallback_tokenizer()
    ids = tokenizer.encode("hello world stop")
    assert tokenizer.convert_ids_to_tokens(ids) == ["\u2581hello", "\u2581world", "\u2581stop"]
    _, streamed, _ = stream(tokenizer, ids[1:], prompt=ids[:1])
    assert streamed == " world stop"
    _, streamed, _ = stream(tokenizer, ids)  # no prompt: the first space is stripped
    assert streamed == "hello world stop"


def run_stop(text: str, stop, include: bool = False, tokenizer=None):
    tokenizer = tokenizer or byte_level_tokenizer()
    params = SamplingParams(stop=stop, include_stop_str_in_output=include)
    return stream(tokenizer, tokenizer.encode(text), params)


def test_stop_string_across_token_boundaries():
    tokenizer = byte_level_tokenizer()
    text = "Hello world! Hello there."
    ids = tokenizer.encode(text)
    # The stop string must span several tokens for this test to mean anything.
    assert not any("lo wor" in tokenizer.decode([t]) for t in ids)
    detok, streamed, stop = run_stop(text, "lo wor")
    assert stop == "lo wor" and detok.stop_string == "lo wor"
    assert detok.output_text == streamed == "Hel"
    detok, streamed, stop = run_stop(text, "lo wor", include=True)
    assert detok.output_text == streamed == "Hello wor"


def test_earliest_stop_string_wins():
    detok, _, stop = run_stop("Hello world! Hello there.", ["there", "o w", "world"])
    assert stop == "o w" and detok.output_text == "Hell"
    # Both complete in one multi-token update: the one that ends first wins.
    tokenizer = byte_level_tokenizer()
    params = SamplingParams(stop=["abcd", "bc"])
    detok = IncrementalDetokenizer(tokenizer, [], params)
    assert detok.update(tokenizer.encode("xabcdy")) == "bc"
    assert detok.output_text == "xa"


def test_stop_string_not_found():
    detok, streamed, stop = run_stop("Hello world", ["xyz", "worlds"])
    assert stop is None and streamed == "Hello world"


def test_updates_after_a_stop_are_ignored():
    tokenizer = byte_level_tokenizer()
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop="o"))
    assert detok.update(tokenizer.encode("Hello")) == "o"
    assert detok.update(tokenizer.encode(" more")) is None
    assert detok.output_text == "Hell"


def test_stop_strings_wait_for_min_tokens():
    tokenizer = byte_level_tokenizer()
    params = SamplingParams(stop="e", min_tokens=3)
    detok = IncrementalDetokenizer(tokenizer, [], params)
    ids = tokenizer.encode("e" * 8)
    results = [detok.update([t]) for t in ids[:4]]
    assert results[:2] == [None, None] and results[2] == "e"


def test_stop_string_completed_before_min_tokens_is_not_found_later():
    tokenizer = byte_level_tokenizer()
    a, b, c = (tokenizer.encode(ch) for ch in "abc")
    assert len(a) == len(b) == len(c) == 1
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=["a", "bc"], min_tokens=2))
    assert detok.update(a) is None  # below min_tokens: not checked
    assert detok.update(b) is None  # "a" lies wholly in text that was already checked
    assert detok.update(c) == "bc"  # spans the boundary: found
    assert detok.output_text == "a"


def test_delta_holds_back_a_possible_stop_prefix():
    tokenizer = byte_level_tokenizer()
    params = SamplingParams(stop=["STOP!"])
    detok = IncrementalDetokenizer(tokenizer, [], params)
    sent = ""
    for piece in ["Hello ", "ST", "O", "P", "P", "ed ", "S", "T"]:
        assert detok.update(tokenizer.encode(piece)) is None
        sent += detok.get_delta(finished=False)
        # The unsent tail is exactly the longest suffix that starts "STOP!".
        tail = detok.output_text[len(sent) :]
        assert "STOP!".startswith(tail)
    assert sent == "Hello STOPPed "
    assert detok.get_delta(finished=True) == "ST"


@SETTINGS
@given(
    st.text(alphabet="ab ce😀", min_size=1, max_size=30),
    st.lists(st.text(alphabet="ab ce😀", min_size=1, max_size=4), min_size=1, max_size=3),
    st.booleans(),
)
def test_stop_strings_random(text: str, stops: list[str], include: bool):
    detok, streamed, stop = run_stop(text, stops, include)
    # Token by token, the first stop string to be completed in the text wins.
    matches = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
    if not matches:
        assert stop is None and streamed == text
        return
    end, start, expected = min(matches)
    assert stop == expected
    assert streamed == text[: end if include else start]


def test_skip_special_tokens():
    tokenizer = byte_level_tokenizer()
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    ids = tokenizer.encode("Hello") + [end] + tokenizer.encode(" world") + [end]
    _, streamed, _ = stream(tokenizer, ids, SamplingParams(skip_special_tokens=True))
    assert streamed == "Hello world"
    params = SamplingParams(skip_special_tokens=False, spaces_between_special_tokens=False)
    _, streamed, _ = stream(tokenizer, ids, params)
    assert streamed == "Hello<|end|> world<|end|>"
    params = SamplingParams(skip_special_tokens=False, spaces_between_special_tokens=True)
    _, streamed, _ = stream(tokenizer, ids, params)
    assert streamed == "Hello <|end|>  world <|end|>"


def test_stop_string_on_special_token_text():
    tokenizer = byte_level_tokenizer()
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    ids = tokenizer.encode("Hi") + [end] + tokenizer.encode("more")
    params = SamplingParams(
        stop="<|end|>", skip_special_tokens=False, spaces_between_special_tokens=False
    )
    detok, streamed, stop = stream(tokenizer, ids, params)
    assert stop == "<|end|>" and streamed == "Hi"


def test_special_tokens_in_prompt_context_are_handled():
    tokenizer = byte_fallback_tokenizer()
    bos = tokenizer.bos_token_id
    ids = tokenizer.encode("hello world")
    _, streamed, _ = stream(tokenizer, ids[1:], prompt=[bos, ids[0]])
    assert streamed == " world"


def test_decode_token():
    tokenizer = byte_level_tokenizer()
    (the,) = tokenizer.encode(" the")
    assert decode_token(tokenizer, the) == " the"
    assert decode_token(tokenizer, tokenizer.eos_token_id) == "<|end|>"
    sp = byte_fallback_tokenizer()
    (hello,) = sp.encode("hello")
    assert sp.decode([hello]) == "hello"  # a lone piece loses its space when decoded...
    assert decode_token(sp, hello) == " hello"  # ...but not for display
    assert decode_token(sp, sp.convert_tokens_to_ids("<0xE2>")) == "\ufffd"
