"""What a model is, to the fabric: its id, how to run it, what it can do, its state."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .codec import Json

ModelId = str
"""A logical model identifier, as clients name it (``"smollm2-135m-instruct"``)."""


class Workload(enum.Enum):
    """What kind of work a model can do."""

    CHAT = "chat"
    COMPLETION = "completion"
    EMBEDDING = "embedding"
    VISION = "vision"


class WorkloadClass(enum.Enum):
    """A request classified by behaviour and footprint, for scheduling."""

    CHAT_INTERACTIVE = "chat_interactive"
    CHAT_BULK = "chat_bulk"
    COMPLETION_INTERACTIVE = "completion_interactive"
    COMPLETION_BULK = "completion_bulk"
    EMBEDDING = "embedding"
    VISION_CAPTION = "vision_caption"


@dataclass(frozen=True, slots=True)
class ModelCapability:
    """What a model can do and what it costs to hold.

    ``memory_mb`` is the approximate resident memory (VRAM on a GPU backend, RAM on CPU);
    ``min_devices`` / ``min_device_vram_mb`` are GPU placement constraints (0 = CPU is fine).
    """

    workloads: tuple[Workload, ...] = (Workload.CHAT, Workload.COMPLETION)
    max_context: int | None = None
    max_output: int | None = None
    memory_mb: int = 0
    min_devices: int = 0
    min_device_vram_mb: int = 0
    tokens_per_second: float | None = None


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """How a neuron starts and talks to a model backend; pushed by the cortex at run time.

    Attributes:
        model_id: the logical id clients use.
        backend_kind: a key of the neuron's backend registry (``"llama_cpp"``,
            ``"exllamav2"``, ``"openai_proxy"``, ``"embeddings"``, ``"synthetic"``).
        command, args, env: for backends that supervise an external process.
        listen_endpoint: base URL of an OpenAI-style server (``openai_proxy``).
        metadata: backend-specific parameters (a GGUF path, context size, slots, ...).
    """

    model_id: ModelId
    backend_kind: str
    command: str | None = None
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    listen_endpoint: str | None = None
    metadata: dict[str, Json] = field(default_factory=dict)
    capability: ModelCapability = field(default_factory=ModelCapability)

    def __post_init__(self) -> None:
        if not self.model_id:
            raise ValueError("model_id must not be empty")
        if not self.backend_kind:
            raise ValueError("backend_kind must not be empty")


class ModelState(enum.Enum):
    CONFIGURED = "configured"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class ModelStatus:
    """One model's state on one neuron."""

    model_id: ModelId
    state: ModelState
    backend_kind: str = ""
    progress: float | None = None
    error: str | None = None
    in_flight: int = 0
    memory_bytes: int = 0
