"""Ollama's API (``/api/*``): its request bodies as typed models, their translation into
the fabric's requests, and its response objects. Pure: no I/O.

The models are lenient to unknown fields and strict about the ones they know, like the
OpenAI ones (:mod:`.openai_requests`): a malformed body is a 400 naming the field before a
neuron sees it. Ollama's ``options`` map onto the fabric's sampling: ``temperature``,
``top_p``, ``top_k``, ``min_p``, ``num_predict`` (``-1``/``-2``/``0``: no limit of its own),
``stop``, ``seed`` (``-1``: none, as Ollama means it), ``repeat_penalty``, ``presence_penalty``,
``frequency_penalty``; the runner's own knobs (``num_ctx``, ``num_gpu``, ``mirostat``...) are accepted and left to
the neuron's configuration. ``format`` is ``"json"`` (any JSON object) or a JSON schema,
enforced by the backend's grammar as ``response_format`` is. ``keep_alive`` (parsed as
Ollama does, :mod:`.ollama_keep_alive`) and ``think`` are accepted; where a model stays
loaded is the orchestrator's decision (``keep_alive`` 0 with nothing to generate, Ollama's
unload, is answered as Ollama answers it and unloads nothing).

The fabric request streams when the client's answer does, so that the final object's
durations split the prompt's evaluation (to the first token) from the generation; an answer
in one object asks the fabric for one too (it can then be tried again elsewhere until it
ends), and the neuron's ``first_token_s`` makes the same split. Model names are the
portal's public names; ``name:latest`` is the same model as ``name``.
Tool calls travel as Ollama writes them (``arguments`` an object) and become OpenAI's
(``arguments`` a JSON string, an ``id`` each) inside: a ``tool`` message is answered to
the earliest unanswered call of the same ``tool_name`` (or the earliest at all).
"""

from __future__ import annotations

import base64
import json
import time
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from helexa.protocol import (
    EmbedRequest,
    GenerateRequest,
    OutputFormat,
    ResponseFormat,
    SamplingParams,
    Task,
    TokenLogprob,
)

from .errors import BadRequest
from .ollama_keep_alive import seconds as keep_alive_seconds
from .openai_api import MAX_EMBED_INPUTS, tool_specs
from .openai_requests import FieldError, Int64, Lenient, Off, On, Tool, _wire_json
from .schema_check import check_schema

VERSION = "0.12.0"
"""The Ollama API version ``/api/version`` reports: the one whose endpoints and fields this
surface implements (clients gate features on it)."""


RANDOM_SEED = -1
"""``options.seed`` that means "no seed" to Ollama (its default): the fabric samples unseeded.
Any other 64-bit seed, negative ones too, is a seed."""


class Options(Lenient):
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0, le=2**31 - 1)
    min_p: float | None = Field(None, ge=0, le=1)
    num_predict: int | None = Field(None, ge=-2, le=2**31 - 1)
    stop: str | list[str] | None = None
    seed: Int64 | None = None
    repeat_penalty: float | None = Field(None, gt=0, le=100)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    num_ctx: int | None = Field(None, ge=1)


Format = Literal["json", ""] | dict[str, Any]


class Common(Lenient):
    model: str = Field(min_length=1)
    options: Options | None = None
    keep_alive: float | None = Field(None, allow_inf_nan=True)
    """In seconds, parsed as Ollama parses it (:mod:`.ollama_keep_alive`; ``math.inf``: forever)."""

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float | None:
        return keep_alive_seconds(value)


class GenerateCommon(Common):
    stream: On = True
    format: Format | None = None
    think: bool | Literal["low", "medium", "high"] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @field_validator("format")
    @classmethod
    def _travels(cls, value: Any) -> Any:
        return _wire_json(value)


class ToolCallFunction(Lenient):
    name: str = Field(min_length=1)
    arguments: dict[str, Any] | str = Field(default_factory=dict)
    """An object, as Ollama writes it (a JSON string, as some clients send, is taken too)."""
    index: int | None = None

    @field_validator("arguments")
    @classmethod
    def _travels(cls, value: Any) -> Any:
        return _wire_json(value)


class ToolCall(Lenient):
    function: ToolCallFunction
    id: str | None = None
    type: Literal["function"] | None = None


class Message(Lenient):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    images: list[Annotated[str, Field(min_length=1)]] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None
    thinking: str | None = None


class ChatBody(GenerateCommon):
    messages: list[Message] = Field(default_factory=list)
    tools: list[Tool] | None = None

    @model_validator(mode="after")
    def _unique_tools(self) -> "ChatBody":
        if self.tools and len({t.function.name for t in self.tools}) != len(self.tools):
            raise FieldError("tool names must be unique", "tools")
        return self


class GenerateBody(GenerateCommon):
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: Off = False
    images: list[Annotated[str, Field(min_length=1)]] | None = None


class EmbedBody(Common):
    input: str | list[str]
    truncate: bool | None = None
    dimensions: int | None = Field(None, ge=1)


class EmbeddingsBody(Common):
    prompt: str


class NamedModel(Lenient):
    """A body that names one model as ``model`` (or Ollama's legacy ``name``)."""

    model: str | None = Field(None, min_length=1)
    name: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _named(self) -> "NamedModel":
        if self.model is None and self.name is None:
            raise FieldError("model is required", "model")
        return self

    @property
    def asked(self) -> str:
        return self.model or self.name or ""


class ShowBody(NamedModel):
    verbose: bool | None = None


# --- requests -----------------------------------------------------------------------------


def sampling(body: GenerateCommon) -> SamplingParams:
    o = body.options or Options()
    stop = (o.stop,) if isinstance(o.stop, str) else tuple(o.stop or ())
    if any(not s for s in stop):
        raise BadRequest("options.stop: stop sequences must not be empty", param="options.stop")
    if len(stop) > 16:
        raise BadRequest("options.stop: at most 16 stop sequences", param="options.stop")
    try:
        return SamplingParams(
            max_tokens=o.num_predict if o.num_predict is not None and o.num_predict > 0 else None,
            temperature=o.temperature, top_p=o.top_p, top_k=o.top_k, min_p=o.min_p, stop=stop,
            seed=None if o.seed == RANDOM_SEED else o.seed,
            repetition_penalty=o.repeat_penalty, presence_penalty=o.presence_penalty,
            frequency_penalty=o.frequency_penalty, logprobs=bool(body.logprobs or body.top_logprobs),
            top_logprobs=body.top_logprobs or 0)
    except ValueError as exc:
        raise BadRequest(str(exc), param="options") from None


def response_format(fmt: Format | None) -> ResponseFormat | None:
    if not fmt:
        return None
    if fmt == "json":
        return ResponseFormat(OutputFormat.JSON_OBJECT)
    check_schema(fmt, "format")
    return ResponseFormat(OutputFormat.JSON_SCHEMA, fmt, "schema")


def _image_url(data: str) -> str:
    head = data[:16]
    try:
        raw = base64.b64decode(head + "=" * (-len(head) % 4))
    except ValueError:
        raw = b""
    mime = ("image/png" if raw.startswith(b"\x89PNG") else "image/jpeg" if raw.startswith(b"\xff\xd8")
            else "image/gif" if raw.startswith(b"GIF8") else "image/webp" if raw[8:12] == b"WEBP" else "image/png")
    return f"data:{mime};base64,{data}"


def _user(content: str, images: list[str] | None) -> Any:
    if not images:
        return content
    return [{"type": "text", "text": content}, *({"type": "image_url", "image_url": {"url": _image_url(i)}}
                                                 for i in images)]


def chat_messages(body: ChatBody) -> tuple[list[dict[str, Any]], str | None]:
    """The conversation as OpenAI-shaped chat messages, and where its first image is."""
    out: list[dict[str, Any]] = []
    pending: list[tuple[str, str]] = []  # (name, id) of calls not answered yet
    image: str | None = None
    for i, m in enumerate(body.messages):
        content = m.content or ""
        match m.role:
            case "user":
                if m.images:
                    image = image or f"messages[{i}].images[0]"
                out.append({"role": "user", "content": _user(content, m.images)})
            case "system":
                out.append({"role": "system", "content": content})
            case "assistant":
                message: dict[str, Any] = {"role": "assistant"}
                if content or not m.tool_calls:
                    message["content"] = content
                if m.tool_calls:
                    pending = []
                    calls = []
                    for j, call in enumerate(m.tool_calls):
                        call_id = call.id or f"call_{i}_{j}"
                        pending.append((call.function.name, call_id))
                        calls.append({"id": call_id, "type": "function", "function": {
                            "name": call.function.name, "arguments": args if isinstance(
                                args := call.function.arguments, str) else json.dumps(args)}})
                    message["tool_calls"] = calls
                out.append(message)
            case "tool":
                call_id = m.tool_call_id
                if call_id is None:
                    match = next((p for p in pending if p[0] == m.tool_name), pending[0] if pending else None)
                    if match is None:
                        raise BadRequest(f"messages[{i}]: a tool message answers no tool call before it",
                                         param=f"messages[{i}]")
                    pending.remove(match)
                    call_id = match[1]
                out.append({"role": "tool", "tool_call_id": call_id, "content": content})
    return out, image


def chat_request(body: ChatBody, request_id: str, model: str) -> tuple[GenerateRequest, str | None]:
    """The fabric request for ``/api/chat`` (``model``: the public name, ``:latest`` gone)."""
    messages, image = chat_messages(body)
    return GenerateRequest(
        request_id, model, Task.CHAT, messages=tuple(messages), sampling=sampling(body), stream=True,
        tools=tool_specs(body.tools or ()), response_format=response_format(body.format)), image


def generate_request(body: GenerateBody, request_id: str, model: str) -> tuple[GenerateRequest, str | None]:
    """The fabric request for ``/api/generate``: the prompt as a chat turn (the model's own
    template applies, as Ollama's does), or as is with ``raw``."""
    for name in ("suffix", "template"):
        if getattr(body, name):
            raise BadRequest(f"{name} is not supported here", param=name, code="unsupported")
    if body.context:
        raise BadRequest("context (token ids of an earlier answer) is not supported: send the conversation to "
                         "/api/chat instead", param="context", code="unsupported")
    prompt = body.prompt or ""
    if body.raw:
        if body.images:
            raise BadRequest("images need a chat turn, not raw", param="images", code="unsupported")
        return GenerateRequest(request_id, model, Task.COMPLETION, prompt=prompt, sampling=sampling(body),
                               stream=True, response_format=response_format(body.format)), None
    messages = ([{"role": "system", "content": body.system}] if body.system else []) + [
        {"role": "user", "content": _user(prompt, body.images)}]
    return GenerateRequest(request_id, model, Task.CHAT, messages=tuple(messages), sampling=sampling(body),
                           stream=True, response_format=response_format(body.format)), (
        "images[0]" if body.images else None)


def embed_request(inputs: str | list[str], request_id: str, model: str, param: str, *,
                  truncate: bool = True) -> EmbedRequest:
    """An embedding request; ``truncate`` (Ollama's default) cuts an input longer than the
    model's context to it, else such an input is a 400."""
    texts = (inputs,) if isinstance(inputs, str) else tuple(inputs)
    if not texts or any(not t for t in texts):
        raise BadRequest(f"{param}: every input must be a non-empty string", param=param)
    if len(texts) > MAX_EMBED_INPUTS:
        raise BadRequest(f"{param}: at most {MAX_EMBED_INPUTS} inputs per request, got {len(texts)}", param=param)
    return EmbedRequest(request_id, model, texts, truncate=truncate)


# --- responses ----------------------------------------------------------------------------


def timestamp(at: float | None = None) -> str:
    """RFC 3339 in UTC with nanoseconds, as Ollama writes ``created_at``."""
    at = time.time() if at is None else at
    whole = int(at)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{int((at - whole) * 1e9):09d}Z"


def logprobs_body(logprobs: tuple[TokenLogprob, ...] | None) -> list[dict[str, Any]]:
    return [{"token": lp.token, "logprob": lp.logprob,
             "top_logprobs": [{"token": t.token, "logprob": t.logprob} for t in lp.top]} for lp in logprobs or ()]


def tool_calls_body(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI-shaped whole calls as Ollama's: ``arguments`` an object."""
    out = []
    for i, call in enumerate(calls):
        fn = call.get("function") or {}
        args = fn.get("arguments") or "{}"
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                args = {"_raw": args}  # never seen from the grammar path; kept, not dropped
        out.append({"id": call.get("id"), "function": {"index": i, "name": fn.get("name") or "", "arguments": args}})
    return out


def done_reason(finish_reason: str) -> str:
    return "length" if finish_reason == "length" else "stop"
