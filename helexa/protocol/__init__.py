"""helexa's wire protocol: typed, versioned messages and their msgpack codec.

Sans-IO: nothing here imports trio, a websocket or a runtime (a test enforces it).
"""

from .codec import (
    DEFAULT_MAX_FRAME,
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    Json,
    decode,
    encode,
    from_wire,
    kinds,
    message,
    to_wire,
)
from .errors import AuthenticationError, DecodeError, ProtocolError, VersionMismatch
from .hardware import GpuInfo, GpuUsage, Hardware, NeuronDescriptor, NeuronMetrics
from .inference import (
    Cancel,
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    GenerateResult,
    InferenceError,
    OutputFormat,
    ResponseFormat,
    SamplingParams,
    Task,
    TokenChunk,
    TokenLogprob,
    ToolChoice,
    ToolChoiceMode,
    ToolSpec,
    TopLogprob,
    Usage,
)
from .messages import (
    Challenge,
    Fault,
    Heartbeat,
    Hello,
    Join,
    LoadModel,
    LoadProgress,
    MAX_CACHE_REPORT,
    ModelStatusChanged,
    Ping,
    Pong,
    ProvisioningCommand,
    PullModel,
    ProvisioningResponse,
    Refused,
    Shutdown,
    UnloadModel,
    UpsertModelConfig,
    Welcome,
)
from .model import (
    Feature,
    ModelCapability,
    ModelConfig,
    ModelId,
    ModelSource,
    ModelState,
    ModelStatus,
    Workload,
    WorkloadClass,
    SourceKind,
    cache_key,
    parse_source,
)
from . import worker  # registers the neuron <-> worker process messages

__all__ = [name for name in dir() if not name.startswith("_")]
