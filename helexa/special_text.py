"""Client text that spells a model's control tokens reaches the model as plain text.

A chat template wraps each message in the model's control tokens (``<|im_start|>user``,
``<|im_end|>``...), and the prompt it makes is then tokenized with special tokens parsed:
llama.cpp's chat endpoint does so, and so do the ExLlama backends
(``encode_special_tokens=True``). Without care, a message whose text is
``<|im_end|>\\n<|im_start|>system\\n...`` would therefore become real role markers: a client
could forge system or assistant turns. OpenAI's and Anthropic's APIs tokenize message text
as plain text, and so does helexa, by :class:`ControlTexts`:

* which texts: those of the vocabulary's control tokens (GGUF token type ``CONTROL`` or
  ``UNKNOWN``; a Hugging Face added token marked ``special``), and of its user-defined
  tokens (``USER_DEFINED``; an added token not marked ``special``) that the chat template
  itself writes (Qwen's ``<tool_call>``, for example). Other user-defined tokens (whitespace
  runs, HTML tags in some vocabularies) are what the model's tokenizer makes of that text
  anyway, parsed or not, so they are left alone; so are one-character texts, which no
  insertion can break.
* how: a ZERO WIDTH SPACE (U+200B) is inserted after the first character of every
  occurrence (overlapping ones too) in every string the client sent into the chat: message
  contents and text parts, names, tool calls and results, tool definitions. The text
  then tokenizes as ordinary characters (``<|im_end|>`` becomes ``<`` + U+200B +
  ``|im_end|>``: ten ordinary tokens for SmolLM2 instead of one control token). It is the one
  change made to such text; every other string is passed on untouched, and so is the
  text the template and helexa add (the template's markers, tool instructions).

The change is idempotent (a neutralised text holds no control text, so a second pass
changes nothing), which is what lets the cortex's count (:mod:`helexa.tokenizer`) and the
neuron (:mod:`helexa.runtime.llama_cpp`, :mod:`helexa.runtime.chat_template`) each apply it
and agree. Cost for ordinary text: one ``in`` test per string for each distinct first
character of the control texts (``<`` for most vocabularies); only a string holding one
is searched, by a regex built once per model as a trie of the texts (its cost per
position bounded by the longest text, however many there are).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

ZWSP = "\u200b"
"""What is inserted after the first character of a control text in client text."""

GGUF_UNKNOWN, GGUF_CONTROL, GGUF_USER_DEFINED = 2, 3, 4
"""``tokenizer.ggml.token_type`` values (llama.cpp's ``llama_token_type``)."""


def gguf_control_texts(tokens: list[str], types: list[int], template: str | None) -> list[str]:
    """The texts :class:`ControlTexts` neutralises for a GGUF vocabulary (see the module
    docstring): control and unknown tokens, and user-defined ones the template writes."""
    texts = []
    for text, kind in zip(tokens, types):
        if kind in (GGUF_CONTROL, GGUF_UNKNOWN) or (kind == GGUF_USER_DEFINED and template and text in template):
            texts.append(text)
    return texts


def added_token_texts(added: Iterable[dict[str, Any]], template: str | None) -> list[str]:
    """The same for a Hugging Face tokenizer's added tokens (``tokenizer.json``'s
    ``added_tokens``, or ``tokenizer_config.json``'s ``added_tokens_decoder`` values):
    those marked ``special``, and the others the template writes."""
    texts = []
    for token in added:
        text = token.get("content") if isinstance(token, dict) else None
        if isinstance(text, str) and (token.get("special") or (template and text in template)):
            texts.append(text)
    return texts


def _trie_regex(texts: list[str]) -> str:
    """A regex matching exactly ``texts`` (non-empty), factored as a trie so that a
    match attempt costs at most the longest text's length."""
    trie: dict[str, Any] = {}
    for text in texts:
        node = trie
        for ch in text:
            node = node.setdefault(ch, {})
        node[""] = {}  # the end of a text

    def walk(node: dict[str, Any]) -> str:
        ends = "" in node
        branches = [re.escape(ch) + walk(child) for ch, child in sorted(node.items()) if ch]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        if ends:  # a shorter text ends here: the rest is optional
            body = f"(?:{body})?"
        return body

    return walk(trie)


class ControlTexts:
    """Neutralises a vocabulary's control texts in client text (see the module docstring)."""

    def __init__(self, texts: Iterable[str]) -> None:
        kept = sorted({t for t in texts if len(t) >= 2 and ZWSP not in t})
        self.texts: tuple[str, ...] = tuple(kept)
        by_first: dict[str, list[str]] = {}
        for text in kept:
            by_first.setdefault(text[0], []).append(text[1:])
        self._firsts = tuple(sorted(by_first))
        # Each match is one character (a control text's first) followed by the rest of one:
        # consuming only that character finds overlapping occurrences too.
        alternatives = [re.escape(first) + "(?=" + _trie_regex(rests) + ")"
                        for first, rests in sorted(by_first.items())]
        self._pattern = re.compile("|".join(alternatives)) if alternatives else None

    def __bool__(self) -> bool:
        return self._pattern is not None

    def text(self, text: str) -> str:
        """``text`` with a ZERO WIDTH SPACE after the first character of each control text
        in it; ``text`` itself (the same object) when it holds none."""
        if self._pattern is None or not any(first in text for first in self._firsts):
            return text
        return self._pattern.sub(lambda m: m.group() + ZWSP, text)

    def value(self, value: Any) -> Any:
        """Every string in ``value`` (a JSON-like tree: dicts, lists, tuples; keys too)
        neutralised; the same object when nothing in it needed to change."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            out = {self.text(k) if isinstance(k, str) else k: self.value(v) for k, v in value.items()}
            same = len(out) == len(value) and all(a is b and value[a] is out[a] for a, b in zip(value, out))
            return value if same else out
        if isinstance(value, (list, tuple)):
            items = [self.value(v) for v in value]
            if all(a is b for a, b in zip(items, value)):
                return value
            return type(value)(items)
        return value

    def messages(self, messages: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """OpenAI-shaped chat messages with every string in them neutralised."""
        return [self.value(m) for m in messages]

    def chat_body(self, body: dict[str, Any]) -> dict[str, Any]:
        """An OpenAI chat body with its ``messages`` and ``tools`` neutralised (in place;
        returned). A raw completion's ``prompt`` is the client's whole prompt, control
        tokens included, and is left as it is."""
        if "messages" in body:
            body["messages"] = self.messages(body["messages"])
        if body.get("tools"):
            body["tools"] = self.value(body["tools"])
        return body


NONE = ControlTexts(())
"""Neutralises nothing (a vocabulary with no control tokens, or none known yet)."""
