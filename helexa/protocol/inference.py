"""Inference requests and their answers, as they travel between cortex and neuron.

These are the fabric's own types, not OpenAI's: the gateway turns an OpenAI body into a
:class:`GenerateRequest`, and the neuron's runtime turns it into a backend call.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .codec import Json, message
from .model import ModelId


class Task(enum.Enum):
    CHAT = "chat"
    COMPLETION = "completion"


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
    ``Task.CHAT``; ``prompt`` the text for ``Task.COMPLETION``. ``extra`` passes fields such
    as ``tools``, ``tool_choice`` and ``response_format`` through to backends that support
    them.
    """

    request_id: str
    model_id: ModelId
    task: Task
    messages: tuple[Json, ...] = ()
    prompt: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stream: bool = True
    extra: dict[str, Json] = field(default_factory=dict)


@message("embed")
@dataclass(frozen=True, slots=True)
class EmbedRequest:
    request_id: str
    model_id: ModelId
    inputs: tuple[str, ...]


@message("chunk")
@dataclass(frozen=True, slots=True)
class TokenChunk:
    """Newly generated text (one token, or several coalesced when a reader fell behind)."""

    request_id: str
    text: str
    tokens: int = 1
    tool_calls: tuple[Json, ...] | None = None


@message("result")
@dataclass(frozen=True, slots=True)
class GenerateResult:
    """The end of a generation. ``text`` holds only text not already sent as chunks."""

    request_id: str
    finish_reason: str
    usage: Usage
    text: str = ""
    tool_calls: tuple[Json, ...] | None = None


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
