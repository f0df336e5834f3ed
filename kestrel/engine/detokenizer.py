"""Incremental detokenization and stop-string matching for one sequence.

Owns: turning a growing list of output token ids into text one step at a time, finding the
request's stop strings in that text (also across token boundaries), and deciding how much of
the text a stream may show. Must not decide finish reasons for stop tokens or lengths (the
scheduler does) and must not hold model or device state.

Decoding works on a sliding window of ids (the offset approach):

    ids:  ... | prefix_offset ....... read_offset ....... end |
                \\_ already emitted __/ \\_ not emitted yet __/

    new text = decode(ids[prefix_offset:]) minus decode(ids[prefix_offset:read_offset])

Decoding from `prefix_offset` (a few tokens back) rather than from `read_offset` keeps
context-dependent pieces right (SentencePiece's leading-space stripping, byte-level tokens of a
multi-byte character). New text is emitted only once it no longer ends in U+FFFD, i.e. once
every UTF-8 character it contains is complete; then both offsets move forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kestrel.sampling_params import SamplingParams

_REPLACEMENT = "\ufffd"
# Prompt tokens kept as decoding context for the first output tokens.
_PROMPT_CONTEXT_TOKENS = 5
_SPIECE_SPACE = "\u2581"  # SentencePiece's "▁" marks a leading space


def _raw_decoder(tokenizer: Any, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    """ids -> text, without the transformers "clean up tokenization spaces" pass, which can
    rewrite text before the end and so cannot be applied incrementally."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(
        ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
    )


def make_decoder(tokenizer: Any, params: SamplingParams) -> Callable[[list[int]], str]:
    """ids -> text under `params.skip_special_tokens` / `spaces_between_special_tokens`.

    When special tokens are kept and spaces_between_special_tokens is set, each special token
    is separated from its neighbours by one space (the slow-tokenizer convention), e.g.
    "Hello <|im_end|>"; otherwise they are concatenated as the tokenizer decodes them.
    """
    raw = _raw_decoder(tokenizer, params.skip_special_tokens)
    if params.skip_special_tokens or not params.spaces_between_special_tokens:
        return raw
    special = frozenset(getattr(tokenizer, "all_special_ids", ()) or ())
    if not special:
        return raw

    def decode(ids: list[int]) -> str:
        if special.isdisjoint(ids):
            return raw(ids)
        parts: list[str] = []
        run: list[int] = []
        for tok in ids:
            if tok in special:
                if run:
                    parts.append(raw(run))
                    run = []
                parts.append(raw([tok]))
            else:
                run.append(tok)
        if run:
            parts.append(raw(run))
        return " ".join(parts)

    return decode


def decode_token(tokenizer: Any, token_id: int) -> str:
    """Text of one token for logprob display (special tokens shown; a SentencePiece piece's
    leading space kept even though decoding it alone would strip it)."""
    text = _raw_decoder(tokenizer, False)([token_id])
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(piece, str) and piece.startswith(_SPIECE_SPACE) and not text.startswith(" "):
        text = " " + text
    return text


class IncrementalDetokenizer:
    """Text of one sequence's output tokens, built as tokens arrive.

    NOTE: `output_text` only ever grows by complete characters, and once a stop string has
    matched it is final (truncated before the stop string, or after it when
    `include_stop_str_in_output`) and further updates are ignored. Stop strings are not looked
    for while fewer than `min_tokens` tokens exist.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self._decode = make_decoder(tokenizer, params)
        self._params = params
        self._stops: list[str] = list(params.stop or [])
        # Window of ids still needed for decoding; starts with a little prompt context.
        self._ids: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._prefix_text: str | None = None  # decode(ids[prefix:read]) cache
        self._num_output_tokens = 0
        self._text = ""
        self._num_sent = 0  # chars of _text already returned by get_delta
        self.stop_string: str | None = None  # the stop string that matched, if any

    @property
    def output_text(self) -> str:
        return self._text

    @property
    def num_output_tokens(self) -> int:
        return self._num_output_tokens

    def update(self, new_token_ids: list[int]) -> str | None:
        """Append tokens; return the stop string that matched in the new text, else None."""
        if self.stop_string is not None:
            return None
        old_len = len(self._text)
        if not self._stops:  # nothing to match token by token: one decode for the batch
            self._ids.extend(new_token_ids)
            self._num_output_tokens += len(new_token_ids)
            self._text += self._decode_pending(final=False)
            return None
        for tok in new_token_ids:
            self._ids.append(tok)
            self._num_output_tokens += 1
            self._text += self._decode_pending(final=False)
        if self._num_output_tokens < self._params.min_tokens:
            return None
        return self._check_stop(old_len)

    def get_delta(self, finished: bool) -> str:
        """Text not returned by an earlier call.

        While not finished, a tail that could still grow into a stop string is held back, so a
        stream never shows text that a stop string later removes. When finished, everything is
        returned, including a trailing incomplete character (as U+FFFD, like a full decode).
        """
        if finished and self.stop_string is None:
            self._text += self._decode_pending(final=True)
        end = len(self._text)
        if not finished and self.stop_string is None:
            end -= self._stop_prefix_len()
        end = max(end, self._num_sent)
        delta = self._text[self._num_sent : end]
        self._num_sent = end
        return delta

    def _decode_pending(self, final: bool) -> str:
        """Text of ids[read_offset:], once complete (or always when `final`); moves offsets."""
        if self._read_offset == len(self._ids):
            return ""
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        prefix_len = len(self._prefix_text)
        if len(new_text) <= prefix_len and not final:
            return ""  # e.g. a skipped special token: nothing to show yet
        if new_text.endswith(_REPLACEMENT) and not final:
            return ""  # an incomplete UTF-8 character: wait for its remaining bytes
        # Drop ids that are no longer needed as context; the window stays a few tokens long.
        del self._ids[: self._read_offset]
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        self._prefix_text = None
        return new_text[prefix_len:]

    def _check_stop(self, old_len: int) -> str | None:
        """Find the stop string that completes first in text added after `old_len`; truncate."""
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self._stops:
            # Start early enough that a match spanning the old/new boundary is found, but
            # late enough that a match lying wholly in old text (already rejected) is not.
            start = self._text.find(stop, max(0, old_len - len(stop) + 1))
            if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
                best = (start + len(stop), start, stop)
        if best is None:
            return None
        end, start, stop = best
        self._text = self._text[: end if self._params.include_stop_str_in_output else start]
        self.stop_string = stop
        return stop

    def _stop_prefix_len(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        longest = 0
        text = self._text
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
