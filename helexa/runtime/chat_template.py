"""A model's own chat template, rendered without ``transformers``.

Hugging Face model directories carry their chat template as Jinja (``chat_template.jinja``,
``chat_template.json`` or ``tokenizer_config.json``); :class:`ChatTemplate` renders
OpenAI-shaped messages with it in the sandboxed environment ``apply_chat_template`` uses.
Used by the ExLlama backends (:mod:`helexa.runtime.exllama`), whose engines leave
templating to the caller. Those tokenize the prompt with special tokens parsed, so the
tokenizer's control texts are neutralised in the messages first (:mod:`helexa.special_text`).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from helexa.special_text import NONE, ControlTexts, added_token_texts

from .base import InvalidRequest, LoadFailed, Unsupported


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a model directory's file. Raises :class:`LoadFailed`
    (``corrupt_model``) if it is unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoadFailed(f"{path} cannot be read as JSON: {exc}", code="corrupt_model") from None
    if not isinstance(data, dict):
        raise LoadFailed(f"{path} does not hold a JSON object", code="corrupt_model")
    return data


class ChatTemplate:
    """A model's own chat template, rendered as ``transformers``' ``apply_chat_template``
    renders it (sandboxed Jinja, ``trim_blocks``/``lstrip_blocks``, ``raise_exception``,
    ``strftime_now``, a non-ASCII-escaping ``tojson``) without needing ``transformers``.

    Args:
        source: the Jinja template.
        special_tokens: ``bos_token``, ``eos_token``... as the template sees them.
        control: the tokenizer's control texts, neutralised in the messages' text.
    """

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None,
                 control: ControlTexts = NONE) -> None:
        import jinja2.ext
        import jinja2.sandbox

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise LoadFailed(f"the model's chat template does not parse: {exc}", code="corrupt_model") from None
        self._special = dict(special_tokens or {})
        self.control = control

    @classmethod
    def from_model_dir(cls, path: Path, tokenizer_config: dict[str, Any] | None = None) -> ChatTemplate | None:
        """The template in ``chat_template.jinja``, ``chat_template.json`` or
        ``tokenizer_config.json`` (the default of a list of named templates), in that
        order; ``None`` when the model has none."""
        if tokenizer_config is None:
            file = path / "tokenizer_config.json"
            tokenizer_config = read_json(file) if file.is_file() else {}
        source: Any = None
        if (path / "chat_template.jinja").is_file():
            source = (path / "chat_template.jinja").read_text(encoding="utf-8")
        elif (path / "chat_template.json").is_file():
            source = read_json(path / "chat_template.json").get("chat_template")
        else:
            source = tokenizer_config.get("chat_template")
        if isinstance(source, list):
            source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"), None)
        if not isinstance(source, str) or not source.strip():
            return None
        special = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = tokenizer_config.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                special[key] = value
        return cls(source, special, model_control_texts(path, tokenizer_config, source))

    def render(self, messages: list[dict[str, Any]] | tuple[dict[str, Any], ...]) -> str:
        """The prompt for ``messages``, ending with the assistant's turn.

        Content given as a list of parts is joined when every part is text. Raises
        :class:`Unsupported` for image or audio parts, :class:`InvalidRequest` when the
        template refuses the conversation (``raise_exception``, e.g. roles that do not
        alternate) or fails on it."""
        import jinja2

        plain = [self.control.value(_flatten(i, m)) for i, m in enumerate(messages)]
        try:
            return self._template.render(messages=plain, add_generation_prompt=True, **self._special)
        except _TemplateRefused as exc:
            raise InvalidRequest(f"the model's chat template refused the messages: {exc}") from None
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError) as exc:
            raise InvalidRequest(f"the model's chat template failed on the messages: {exc}") from None


def model_control_texts(path: Path, tokenizer_config: dict[str, Any], template: str) -> ControlTexts:
    """A model directory's control texts (:func:`~helexa.special_text.added_token_texts`):
    the added tokens of ``tokenizer.json`` and of ``tokenizer_config.json``'s
    ``added_tokens_decoder``."""
    decoder = tokenizer_config.get("added_tokens_decoder")
    added: list[Any] = list(decoder.values()) if isinstance(decoder, dict) else []
    if (path / "tokenizer.json").is_file():
        listed = read_json(path / "tokenizer.json").get("added_tokens")
        added += listed if isinstance(listed, list) else []
    return ControlTexts(added_token_texts(added, template))


class _TemplateRefused(Exception):
    pass


def _raise_exception(message: str) -> None:
    raise _TemplateRefused(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _flatten(index: int, message: dict[str, Any]) -> dict[str, Any]:
    content = message.get("content")
    if not isinstance(content, list):
        return dict(message)
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            raise Unsupported(f"messages[{index}] has a {kind or 'malformed'} part; this model takes text only")
        texts.append(str(part.get("text", "")))
    return {**message, "content": "".join(texts)}
