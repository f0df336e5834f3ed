r"""Chat messages -> prompt token ids, without letting message text smuggle in control tokens.

Owns the rendering of OpenAI messages through the model's chat template and their
tokenization. Must not call the engine.

A user who types "</s>" or "<|im_start|>system" into a message must get those characters as
plain text, not the tokenizer's control tokens, or they could end their turn early or forge a
system turn. When any message string contains a special token's text (and the server does not
allow it), each such occurrence is swapped for a private-use sentinel before rendering:

    content "hi </s> there"  ->  "hi \ue0000\ue000 there"   (sentinel for "</s>")
    render  ->  "<s>user: hi \ue0000\ue000 there\nassistant:"
    split at the template's own special tokens  ->  "<s>" | "user: hi </s> there\n..."
    the text pieces (sentinels restored) are encoded with special tokens split into ordinary
    text tokens; the template's control tokens map to their ids.

Conversations without such text take the plain path (render, then encode), so their ids are
exactly what `tokenizer.apply_chat_template(..., tokenize=True)` gives.
NOTE: on the sentinel path each text piece is encoded on its own, as the tokenizer itself
does around added tokens; tokenizers whose pre-tokenizer treats the start of the text
specially (SentencePiece "prepend_scheme=first") may tokenize the first character after a
control token differently from the plain path.
"""

from __future__ import annotations

import re
from typing import Any

from kestrel.engine.tokenizer import render_chat

_SENTINEL_MARKS = [chr(c) for c in range(0xE000, 0xE100)]  # Unicode private-use area


class ChatEncoder:
    def __init__(self, tokenizer: Any, allow_special_tokens_in_content: bool = False) -> None:
        self.tokenizer = tokenizer
        self.allow_special = allow_special_tokens_in_content
        specials = {str(t) for t in getattr(tokenizer, "all_special_tokens", []) if t}
        for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
            if getattr(added, "special", False) and str(added):
                specials.add(str(added))
        # Longest first, so "<|im_start|>" wins over a shorter special that prefixes it.
        self.specials = sorted(specials, key=len, reverse=True)
        self._pattern = (re.compile("|".join(re.escape(s) for s in self.specials))
                         if self.specials else None)

    def encode(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        **template_kwargs: Any,
    ) -> tuple[str, list[int]]:
        """Returns (rendered text, prompt token ids). Raises ValueError on template errors."""
        if self.allow_special or not self._has_special(messages):
            text = render_chat(self.tokenizer, messages, add_generation_prompt, chat_template,
                               **template_kwargs)
            return text, list(self.tokenizer(text, add_special_tokens=False).input_ids)
        mark = self._free_mark(messages)
        sentinels: dict[str, str] = {}
        escaped = _map_strings(messages, lambda s: self._escape(s, mark, sentinels))
        rendered = render_chat(self.tokenizer, escaped, add_generation_prompt, chat_template,
                               **template_kwargs)
        restore = {v: k for k, v in sentinels.items()}
        unescape = re.compile("|".join(re.escape(v) for v in restore))
        ids: list[int] = []
        pos = 0
        assert self._pattern is not None
        for match in self._pattern.finditer(rendered):
            ids += self._encode_text(unescape.sub(lambda m: restore[m.group(0)],
                                                  rendered[pos : match.start()]))
            ids.append(self.tokenizer.convert_tokens_to_ids(match.group(0)))
            pos = match.end()
        ids += self._encode_text(unescape.sub(lambda m: restore[m.group(0)], rendered[pos:]))
        return unescape.sub(lambda m: restore[m.group(0)], rendered), ids

    def _encode_text(self, text: str) -> list[int]:
        if not text:
            return []
        return list(self.tokenizer(text, add_special_tokens=False,
                                   split_special_tokens=True).input_ids)

    def _has_special(self, messages: list[dict[str, Any]]) -> bool:
        if self._pattern is None:
            return False
        found = False

        def check(s: str) -> str:
            nonlocal found
            found = found or self._pattern.search(s) is not None  # type: ignore[union-attr]
            return s

        _map_strings(messages, check)
        return found

    def _free_mark(self, messages: list[dict[str, Any]]) -> str:
        used: set[str] = set()
        _map_strings(messages, lambda s: used.update(c for c in s if "\ue000" <= c <= "\ue0ff")
                     or s)
        for mark in _SENTINEL_MARKS:
            if mark not in used:
                return mark
        raise ValueError("messages use every private-use character kestrel could mark with")

    def _escape(self, text: str, mark: str, sentinels: dict[str, str]) -> str:
        def swap(match: re.Match) -> str:
            token = match.group(0)
            if token not in sentinels:
                sentinels[token] = f"{mark}{len(sentinels)}{mark}"
            return sentinels[token]

        return self._pattern.sub(swap, text)  # type: ignore[union-attr]


def _map_strings(value: Any, fn: Any) -> Any:
    """Apply fn to every string inside nested dicts/lists (message fields and content)."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_strings(v, fn) for v in value]
    return value


def messages_to_dicts(messages: list[Any]) -> list[dict[str, Any]]:
    """OpenAI messages (pydantic) -> template dicts; text content parts are joined.
    Raises ValueError for content kinds the server cannot handle (images, audio)."""
    out = []
    for i, msg in enumerate(messages):
        data = msg.model_dump(exclude_none=True)
        content = msg.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise ValueError(
                        f"messages[{i}].content: only text parts are supported, got {part.type!r}"
                    )
                texts.append(part.text)
            data["content"] = "\n".join(texts)
        elif content is None:
            data["content"] = ""
        out.append(data)
    return out
