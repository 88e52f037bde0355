"""Inference requests and their answers, as they travel between cortex and neuron.

These are the fabric's own types, not OpenAI's: the gateway turns an OpenAI body into a
:class:`GenerateRequest`, and the neuron's runtime turns it into a backend call.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .codec import Json, added_field, message
from .model import ModelId


class Task(enum.Enum):
    CHAT = "chat"
    COMPLETION = "completion"


MAX_TOP_LOGPROBS = 20
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
"""Seeds are any 64-bit integer (what msgpack carries); backends fold them into their own range."""


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Sampling parameters; ``None`` means the backend's default."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: bool = False
    """Return each sampled token's log-probability (:class:`TokenLogprob`)."""
    top_logprobs: int = 0
    """With ``logprobs``: also the ``top_logprobs`` most likely tokens at each position."""

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature is not None and not 0.0 <= self.temperature <= 2.0:
            raise ValueError("temperature must be between 0 and 2")
        if self.top_p is not None and not 0.0 <= self.top_p <= 1.0:
            raise ValueError("top_p must be between 0 and 1")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError("top_k must not be negative")
        if len(self.stop) > 16:
            raise ValueError("at most 16 stop sequences")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise ValueError("seed must fit in 64 bits")


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A function the model may call: its ``parameters`` are a JSON Schema object (the
    runtime checks what it needs: :func:`helexa.runtime.openai_shapes.validate`)."""

    name: str
    description: str | None = None
    parameters: Json = None
    strict: bool = False


class ToolChoiceMode(enum.Enum):
    NONE = "none"
    AUTO = "auto"
    REQUIRED = "required"
    FUNCTION = "function"
    """Call the one tool named by :attr:`ToolChoice.name`."""


@dataclass(frozen=True, slots=True)
class ToolChoice:
    mode: ToolChoiceMode = ToolChoiceMode.AUTO
    name: str | None = None


class OutputFormat(enum.Enum):
    TEXT = "text"
    JSON_OBJECT = "json_object"
    JSON_SCHEMA = "json_schema"


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """Structured output: any JSON object, or JSON valid against ``schema``. Backends with a
    grammar enforce it while sampling; the others refuse the request."""

    kind: OutputFormat = OutputFormat.TEXT
    schema: Json = None
    name: str | None = None
    strict: bool = False


@dataclass(frozen=True, slots=True)
class TopLogprob:
    token: str
    logprob: float
    token_bytes: bytes | None = None


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One sampled token's log-probability, and the most likely alternatives at its place."""

    token: str
    logprob: float
    token_bytes: bytes | None = None
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@message("generate")
@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """A chat or completion request.

    ``messages`` holds OpenAI-shaped chat messages (role, content, tool calls) for
    ``Task.CHAT``; ``prompt`` the text for ``Task.COMPLETION``. ``tools``, ``tool_choice``
    and ``response_format`` are what every API surface maps its own tools and structured
    output onto. ``extra`` passes backend fields such as ``logit_bias`` through (older
    cortexes also sent ``tools``, ``tool_choice`` and ``response_format`` there).

    ``prompt_tokens`` is the prompt's token count when the cortex counted it and found it
    fits the model's context: exact, or an upper bound that fits already (the prompt's
    bytes, for most prompts: it never tokenized them). Only a context check reads it, and
    either gives that check's answer. ``None`` leaves the check to the neuron.
    """

    request_id: str
    model_id: ModelId
    task: Task
    messages: tuple[Json, ...] = ()
    prompt: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stream: bool = True
    extra: dict[str, Json] = field(default_factory=dict)
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: ToolChoice | None = None
    response_format: ResponseFormat | None = None
    prompt_tokens: int | None = None
    trace: str = ""
    """The W3C ``traceparent`` of the sender's span (empty while tracing is off)."""
    cache_scope: str = added_field("")
    """Whose prompt cache the request may reuse: an opaque hash the cortex makes of the
    portal and API key (see ``docs/portals.md``). A backend never reuses a prefix computed
    for another scope (``helexa/runtime/slot_table.py``); empty is a scope too."""

    @property
    def wants_tools(self) -> bool:
        """Tools are offered and the model may call them (not ``tool_choice: none``)."""
        return bool(self.tools) and (self.tool_choice is None or self.tool_choice.mode is not ToolChoiceMode.NONE)

    @property
    def wants_json(self) -> bool:
        return self.response_format is not None and self.response_format.kind is not OutputFormat.TEXT


@message("embed")
@dataclass(frozen=True, slots=True)
class EmbedRequest:
    request_id: str
    model_id: ModelId
    inputs: tuple[str, ...]
    trace: str = ""
    """The W3C ``traceparent`` of the sender's span (empty while tracing is off)."""
    truncate: bool | None = added_field(None)
    """Cut an input longer than the model's context to it (Ollama's ``truncate``); if false,
    such an input fails the request with ``context_length_exceeded``. ``None``: not said, by
    a cortex of a release before the field (or, through :mod:`.compat`, by one that sent it
    to such a release, which refuses the field): cut, as those releases always did."""


@message("chunk")
@dataclass(frozen=True, slots=True)
class TokenChunk:
    """Newly generated text (one token, or several coalesced when a reader fell behind).

    ``prompt_tokens``: on a generation's first chunk only, the prompt's exact token count
    as the backend processed it (llama.cpp's prompt progress; an OpenAI-compatible
    upstream's usage when it reported one before its text), so that a generation cut
    short before its result (which carries the usage) bills its real prompt. ``None`` on
    every other chunk, and where the backend cannot say."""

    request_id: str
    text: str
    tokens: int = 1
    tool_calls: tuple[Json, ...] | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None
    prompt_tokens: int | None = added_field()


@message("result")
@dataclass(frozen=True, slots=True)
class GenerateResult:
    """The end of a generation. ``text`` holds only text not already sent as chunks.

    ``stop_sequence`` is the request's stop sequence that ended the text (``finish_reason``
    ``"stop"``), when the backend knows which one did; ``None`` when the model ended on
    its own, ran out of tokens, or the backend cannot say.
    """

    request_id: str
    finish_reason: str
    usage: Usage
    text: str = ""
    tool_calls: tuple[Json, ...] | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None
    stop_sequence: str | None = added_field()
    first_token_s: float | None = added_field()
    """Of an answer not streamed: seconds from the neuron taking the request to the
    backend's first text (what a streamed answer shows by its first chunk); ``None`` when
    the backend gave no text before its result."""


@message("embed_result")
@dataclass(frozen=True, slots=True)
class EmbedResult:
    """Embeddings as little-endian float32, ``len(inputs) * dim`` values."""

    request_id: str
    dim: int
    vectors: bytes
    usage: Usage


@message("inference_error")
@dataclass(frozen=True, slots=True)
class InferenceError:
    """A request failed. ``retryable`` is true when no output was produced and another
    neuron may serve it (model not loaded, neuron draining, out of slots)."""

    request_id: str
    code: str
    message: str
    retryable: bool = False


@message("cancel")
@dataclass(frozen=True, slots=True)
class Cancel:
    """Stop generating for ``request_id`` (the client went away)."""

    request_id: str
