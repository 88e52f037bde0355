"""A GGUF model's tokenizer and chat template, read from the file's metadata alone.

The cortex counts a prompt's tokens before a request costs a neuron anything (a prompt that
cannot fit the context is refused at once), and the same count answers "how many tokens is
this?" questions (Anthropic's ``count_tokens``). It needs the model's own tokenizer and chat
template, but not its weights: both are in the GGUF's metadata, at the front of the file.

How exact a count is:

* **Exact** (the same token ids llama.cpp produces; a test checks SmolLM2 against
  llama.cpp's own ``/tokenize`` and ``/apply-template``) for byte-level BPE vocabularies
  (``tokenizer.ggml.model = "gpt2"``) whose pre-tokenizer is one llama.cpp names and we
  mirror (:data:`PRE_TOKENIZERS`: SmolLM2, StarCoder, GPT-2, Qwen2 and their kin), for a
  chat rendered by the model's template with Jinja2 as llama.cpp renders it (system,
  developer, user, assistant and tool messages with text content).
* **A lower bound** for every other GGUF (SentencePiece vocabularies, pre-tokenizers not in
  the table): ``ceil(bytes / longest token)``, since no token stands for more bytes than the
  longest one in the vocabulary. Also a lower bound whenever tools are offered to a model
  whose template writes tool calls (llama.cpp then adds its own tool instructions); a
  template that does not (:attr:`GgufTokenizer.renders_tool_calls`) gets the tools as a
  system message the caller writes (``helexa.runtime.tool_grammar``), counted exactly.

A lower bound can only refuse prompts that certainly do not fit; the neuron makes the exact
check for the rest before the request waits for a slot (``llama_cpp`` asks llama.cpp to
count). The metadata is read by :func:`read_metadata`, not ``gguf.GGUFReader``: that reader
parses every tensor too and took 11.6 s for SmolLM2's 98 MB file on this machine; the
metadata alone takes well under a second.

Client text that spells a control token (``<|im_end|>``) is counted as the plain text it
reaches the model as (:mod:`helexa.special_text`): a chat is rendered from its messages
with those texts neutralised, exactly as the neuron neutralises them before llama.cpp
renders and tokenizes the prompt.
"""

from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from .special_text import GGUF_CONTROL, GGUF_USER_DEFINED, NONE, ControlTexts, gguf_control_texts

INLINE_CHARS = 32 * 1024
"""Prompts up to this size are counted on the event loop's thread (tens of microseconds);
longer ones in a worker thread, so that a megabyte of prompt never stalls an event loop."""
MAX_METADATA_BYTES = 256 * 1024 * 1024
"""A GGUF whose metadata claims more than this is refused as corrupt."""

PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {}
"""llama.cpp's pre-tokenizer regexes (``llama-vocab.cpp``), by ``tokenizer.ggml.pre``: each
splits the pieces the one before left, keeping both the matches and what lies between."""

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
          r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
for _name in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"):
    PRE_TOKENIZERS[_name] = (r"\p{N}", _GPT2)
for _name in ("gpt-2", "mpt", "olmo", "jais"):
    PRE_TOKENIZERS[_name] = (_GPT2,)
for _name in ("qwen2", "stablelm2"):
    PRE_TOKENIZERS[_name] = (_QWEN2,)

_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
         "tokenizer.ggml.token_type", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token",
         "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template")
_CONTROL_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.chat_template")


class TokenizerError(Exception):
    """The file is not a GGUF, or its metadata is truncated or has no vocabulary."""


# --- GGUF metadata ------------------------------------------------------------------------

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read_metadata(path: Path, keys: tuple[str, ...] = _KEYS) -> dict[str, Any]:
    """The metadata values named by ``keys`` (others are skipped) of the GGUF at ``path``.
    Raises :class:`TokenizerError` for a file that is not a GGUF or is cut short."""
    try:
        with path.open("rb") as f:
            return _read_metadata(f, set(keys))
    except (OSError, struct.error, UnicodeDecodeError, OverflowError) as exc:
        raise TokenizerError(f"{path}: unreadable GGUF metadata ({exc})") from None


def _read_metadata(f: BinaryIO, wanted: set[str]) -> dict[str, Any]:
    head = f.read(8)
    if head[:4] != b"GGUF":
        raise TokenizerError("not a GGUF file")
    version = struct.unpack("<I", head[4:8])[0]
    if version not in (2, 3):
        raise TokenizerError(f"unsupported GGUF version {version}")
    _, kv_count = struct.unpack("<QQ", _exact(f, 16))
    out: dict[str, Any] = {}
    for _ in range(kv_count):
        key = _string(f)
        (vtype,) = struct.unpack("<I", _exact(f, 4))
        out_value = _value(f, vtype, keep=key in wanted)
        if key in wanted:
            out[key] = out_value
    return out


def _exact(f: BinaryIO, n: int) -> bytes:
    if n > MAX_METADATA_BYTES:
        raise TokenizerError("metadata field too large")
    data = f.read(n)
    if len(data) != n:
        raise TokenizerError("GGUF metadata cut short")
    return data


def _string(f: BinaryIO) -> str:
    (n,) = struct.unpack("<Q", _exact(f, 8))
    return _exact(f, n).decode("utf-8", errors="replace")


def _value(f: BinaryIO, vtype: int, *, keep: bool) -> Any:
    if vtype in _SCALARS:
        fmt = _SCALARS[vtype]
        return struct.unpack(fmt, _exact(f, struct.calcsize(fmt)))[0]
    if vtype == 8:
        return _string(f)
    if vtype == 9:
        (itype,) = struct.unpack("<I", _exact(f, 4))
        (n,) = struct.unpack("<Q", _exact(f, 8))
        if itype in _SCALARS and not keep:
            f.seek(n * struct.calcsize(_SCALARS[itype]), 1)
            return None
        if itype in _SCALARS:
            fmt = _SCALARS[itype]
            return list(struct.unpack(f"<{n}{fmt[1]}", _exact(f, n * struct.calcsize(fmt))))
        return [_value(f, itype, keep=keep) for _ in range(n)]
    raise TokenizerError(f"unknown GGUF value type {vtype}")


# --- the tokenizer ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenCount:
    """A prompt's token count: ``exact``, or a lower bound of the true count; or, with
    ``bound``, an upper bound within the room a count was asked for (the prompt's bytes:
    :meth:`GgufTokenizer.most_tokens`), the prompt not tokenized."""

    tokens: int
    exact: bool
    bound: bool = False


class GgufTokenizer:
    """Counts tokens as a GGUF model's llama.cpp would (see the module docstring for which
    counts are exact). Build with :meth:`from_file`; counting is thread-safe."""

    def __init__(self, metadata: dict[str, Any]) -> None:
        tokens = metadata.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens:
            raise TokenizerError("the GGUF has no vocabulary")
        self.model = str(metadata.get("tokenizer.ggml.model", ""))
        self.pre = str(metadata.get("tokenizer.ggml.pre", "default"))
        self._add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False))
        self._add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
        self.vocab_size = len(tokens)
        """How many tokens the vocabulary has: token ids run from 0 to one less."""
        self._longest = max(len(t.encode()) for t in tokens)
        bos, eos = metadata.get("tokenizer.ggml.bos_token_id"), metadata.get("tokenizer.ggml.eos_token_id")
        self._bos = tokens[bos] if isinstance(bos, int) and 0 <= bos < len(tokens) else ""
        self._eos = tokens[eos] if isinstance(eos, int) and 0 <= eos < len(tokens) else ""
        template = metadata.get("tokenizer.chat_template")
        self._template = _compile(template) if isinstance(template, str) else None
        self.control = control_texts(metadata)
        self._bpe = None
        merges = metadata.get("tokenizer.ggml.merges")
        if self.model == "gpt2" and self.pre in PRE_TOKENIZERS and isinstance(merges, list):
            self._bpe = _byte_level_bpe(tokens, merges, metadata.get("tokenizer.ggml.token_type") or [],
                                        PRE_TOKENIZERS[self.pre])

    @classmethod
    def from_file(cls, path: Path) -> "GgufTokenizer":
        """Read ``path``'s metadata (blocking: a few hundred ms for a 50k vocabulary)."""
        return cls(read_metadata(path))

    @property
    def exact(self) -> bool:
        """Whether :meth:`count_text` counts exactly (else it gives a lower bound)."""
        return self._bpe is not None

    def count_text(self, text: str, *, add_special: bool = True, room: int | None = None) -> TokenCount:
        """Tokens of ``text`` as llama.cpp tokenizes a prompt (special tokens written in the
        text are parsed; BOS/EOS added when the vocabulary says so and ``add_special``).
        With ``room``: when :meth:`most_tokens` is at most ``room``, that bound (``bound``),
        without tokenizing (most prompts are far shorter than a context)."""
        if room is not None and (most := self.most_tokens(text, add_special=add_special)) is not None \
                and most <= room:
            return TokenCount(most, False, bound=True)
        extra = self._specials(add_special)
        if self._bpe is not None:
            return TokenCount(self._tokenize(text) + extra, True)
        return TokenCount(math.ceil(len(text.encode("utf-8", "surrogatepass")) / self._longest) + extra, False)

    def _tokenize(self, text: str) -> int:
        """The exact count of ``text``'s tokens (no BOS/EOS): the costly part of a count.
        ``encode_batch``, not ``encode``: the same tokens, but it lets go of Python's GIL while
        it works; ``encode`` held it, so a prompt of megabytes, counted in a worker thread,
        stalled the gateway's event loop for the seconds it took."""
        return len(self._bpe.encode_batch([text], add_special_tokens=False)[0].ids)

    def most_tokens(self, text: str, *, add_special: bool = True) -> int | None:
        """At most how many tokens :meth:`count_text` finds in ``text``, without tokenizing
        it: its UTF-8 bytes, plus BOS/EOS. Sound for the byte-level BPE vocabularies counted
        exactly, where every token (special ones included) stands for at least one byte of
        the text and no space is added in front. ``None`` for the others (a SentencePiece
        vocabulary may spend a token on no byte of the text)."""
        if self._bpe is None:
            return None
        return len(text.encode("utf-8", "surrogatepass")) + self._specials(add_special)

    def _specials(self, add_special: bool) -> int:
        """The BOS/EOS tokens a count adds."""
        return int(add_special and self._add_bos) + int(add_special and self._add_eos)

    def render_chat(self, messages: list[dict[str, Any]]) -> str | None:
        """The prompt the model's chat template makes of ``messages`` (OpenAI-shaped), as
        llama.cpp renders it: ``developer`` is ``system``, text parts are joined by newlines,
        a missing content is empty; the messages' control texts are neutralised
        (:mod:`helexa.special_text`). ``None`` when the GGUF has no template or it fails."""
        if self._template is None:
            return None
        try:
            return self._template.render(messages=[_plain(m) for m in self.control.messages(messages)],
                                         add_generation_prompt=True,
                                         bos_token=self._bos, eos_token=self._eos)
        except Exception:  # a template may raise anything (raise_exception, bad filters)
            return None

    @functools.cached_property
    def renders_tool_calls(self) -> bool:
        """Whether the chat template writes an assistant's tool calls, as llama.cpp tests a
        template for ``supports_tool_calls`` (it renders a call whose argument is named
        ``argument_needle``, as an object or as a string, and looks for the name). A template
        that does not (SmolLM2's) is served tools through a JSON grammar, the tools
        described in the system message (:mod:`helexa.runtime.tool_grammar`)."""
        if self._template is None:
            return False
        for arguments in ({"argument_needle": "print('Hello, World!')"}, '{"argument_needle": "print(1)"}'):
            call = {"id": "call_1___", "type": "function", "function": {"name": "tool1", "arguments": arguments}}
            messages = [{"role": "user", "content": "Hey"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
            try:
                out = self._template.render(messages=messages, add_generation_prompt=False,
                                            bos_token=self._bos, eos_token=self._eos)
            except Exception:  # a template may raise anything
                continue
            if "argument_needle" in out:
                return True
        return False

    def count_chat(self, messages: list[dict[str, Any]], *, tools: bool = False,
                   room: int | None = None) -> TokenCount:
        """The tokens of the prompt ``messages`` make; a lower bound with ``tools`` (backends
        add their own tool instructions) or without a usable template (the contents alone).
        ``room``: as :meth:`count_text`'s, for the rendered prompt (never with ``tools``)."""
        prompt = self.render_chat(messages)
        if prompt is None:
            count = self.count_text("".join(_plain(m)["content"] for m in self.control.messages(messages)))
            return TokenCount(count.tokens, False)
        count = self.count_text(prompt, room=None if tools else room)
        return TokenCount(count.tokens, count.exact and not tools, count.bound)


def control_texts(metadata: dict[str, Any]) -> ControlTexts:
    """The control texts a GGUF's client text is cleared of (:mod:`helexa.special_text`),
    from its metadata (the three keys of :func:`read_control_texts`)."""
    tokens = metadata.get("tokenizer.ggml.tokens")
    types = metadata.get("tokenizer.ggml.token_type")
    template = metadata.get("tokenizer.chat_template")
    if not isinstance(tokens, list) or not isinstance(types, list):
        return NONE
    return ControlTexts(gguf_control_texts(tokens, types, template if isinstance(template, str) else None))


def read_control_texts(path: Path, extra_template: str | None = None) -> ControlTexts:
    """:func:`control_texts` of the GGUF at ``path``, reading only the keys it needs
    (about 70 ms for SmolLM2); ``extra_template``: another template the model is served
    with (llama.cpp's own choice when the file has none), whose user-defined tokens count
    too. Raises :class:`TokenizerError` as :func:`read_metadata` does."""
    metadata = read_metadata(path, _CONTROL_KEYS)
    if extra_template:
        metadata["tokenizer.chat_template"] = f"{metadata.get('tokenizer.chat_template') or ''}\n{extra_template}"
    return control_texts(metadata)


def _plain(message: dict[str, Any]) -> dict[str, Any]:
    content = message.get("content")
    if isinstance(content, list):
        content = "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    role = message.get("role")
    return {**message, "role": "system" if role == "developer" else role,
            "content": content if isinstance(content, str) else ""}


def _compile(source: str) -> Any:
    import jinja2.sandbox  # the cortex imports this module; only a count needs Jinja2

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except jinja2.TemplateError:
        return None


def _byte_level_bpe(tokens: list[str], merges: list[str], types: list[int], regexes: tuple[str, ...]) -> Any:
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges if " " in m]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    special = [tokens[i] for i, t in enumerate(types) if t in (GGUF_CONTROL, GGUF_USER_DEFINED) and i < len(tokens)]
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special if t])
    return tk
