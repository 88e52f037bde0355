"""What a model is, to the fabric: its id, how to run it, what it can do, its state."""

from __future__ import annotations

import enum
import hashlib
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from .codec import Json

ModelId = str
"""A logical model identifier, as clients name it (``"smollm2-135m-instruct"``)."""

MAX_MODEL_ID = 256
"""The longest model id a cortex takes from its catalogue, its neurons or its peers (a
hub repository and file name fit; a request's ``model`` longer than this names nothing)."""
MAX_NEURON_MODELS = 1024
"""The most models one neuron's report (a join, a heartbeat) may name; past it the rest are
dropped (a neuron holds a few; each one reported is in the fleet document pushed to
consoles every second, in ``/metrics`` labels and in the cortex's memory)."""


def model_id_problem(model_id: object) -> str | None:
    """Why ``model_id`` cannot name a model (not a string, empty, longer than
    :data:`MAX_MODEL_ID`, or holding a control or other unprintable character, which
    forged log lines and terminal output), or None when it can. Like
    :func:`~.join_identity.node_id_problem`."""
    if not isinstance(model_id, str):
        return f"the model id is a {type(model_id).__name__}, not a string"
    if not model_id:
        return "the model id is empty"
    if len(model_id) > MAX_MODEL_ID:
        return f"the model id {model_id[:64]!r}... is {len(model_id)} characters long; at most {MAX_MODEL_ID}"
    if not model_id.isprintable():
        return f"the model id {model_id[:64]!r} holds a control or other unprintable character"
    return None


MAX_REPORT_TEXT = 1024
"""The longest free text (a model status's ``error``) a cortex keeps from a neuron's report;
longer is cut, with a mark (:func:`bounded_text`)."""
MAX_NAME = 256
"""The longest name (a peer's operator, a multiaddr) a cortex keeps from a peer, as a model id."""
_BACKEND_KIND = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
_GOOD_KINDS: set[str] = {""}


def bounded_text(text: str, limit: int = MAX_REPORT_TEXT) -> str:
    """``text`` as a cortex keeps a neuron's or a peer's free text: every unprintable
    character (a newline or an escape, which forged log lines and terminal output) written
    as its escape (``\\n``, ``\\x1b``), at most ``limit`` characters, and when that cut
    it, a mark saying from how many. The same object when it holds (an honest report's, on
    every heartbeat)."""
    if len(text) <= limit and text.isprintable():
        return text
    shown = text[:limit]
    cut = len(text) > limit
    if not shown.isprintable():
        shown = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in shown)
        cut = cut or len(shown) > limit
        shown = shown[:limit]
    return f"{shown}... [cut from {len(text)} characters]" if cut else shown


def backend_kind_problem(kind: object) -> str | None:
    """Why ``kind`` cannot be a model status's ``backend_kind`` (a name of up to 64
    letters, digits and ``_.+-``, as every backend's is; empty: not said), or None."""
    if isinstance(kind, str) and (kind in _GOOD_KINDS or _BACKEND_KIND.fullmatch(kind)):
        if len(_GOOD_KINDS) < 64:  # the few real kinds: a heartbeat's check is a set lookup
            _GOOD_KINDS.add(kind)
        return None
    shown = repr(kind[:64]) if isinstance(kind, str) else type(kind).__name__
    return f"the backend kind {shown} is not a name of up to 64 letters, digits and _.+-"


class Workload(enum.Enum):
    """What kind of work a model can do."""

    CHAT = "chat"
    COMPLETION = "completion"
    EMBEDDING = "embedding"
    VISION = "vision"


class Feature(enum.Enum):
    """Generation features beyond plain text that a backend may or may not have.

    ``STRUCTURED_OUTPUT``: JSON output enforced while sampling (a grammar), for
    ``response_format`` ``json_object`` / ``json_schema``. ``TOOLS``: function calling,
    answered as whole tool calls whose arguments are JSON. ``LOGPROBS``: each sampled
    token's log-probability and the most likely alternatives.
    """

    STRUCTURED_OUTPUT = "structured_output"
    TOOLS = "tools"
    LOGPROBS = "logprobs"


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


class SourceKind(enum.Enum):
    PATH = "path"
    HUB = "hub"
    URL = "url"


_HEX64 = re.compile(r"[0-9a-f]{64}")
_HUB_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_LOOPBACK = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True, slots=True)
class ModelSource:
    """Where a model's files come from: a parsed :attr:`ModelConfig.source`.

    ``PATH``: ``location`` is an absolute path on the neuron (a file or a directory), used
    in place. ``HUB``: ``repo`` (``ORG/NAME``) at ``revision`` (``None``: the default
    branch), one file ``filename`` or, when that is ``None``, every file of the repo.
    ``URL``: ``location`` is an ``https://`` (or ``http://``) URL of one file.
    """

    kind: SourceKind
    location: str
    repo: str | None = None
    revision: str | None = None
    filename: str | None = None

    @property
    def whole_repo(self) -> bool:
        return self.kind is SourceKind.HUB and self.filename is None


def parse_source(text: str, *, sha256: str | None = None) -> ModelSource:
    """Parse a model source (see :class:`ModelConfig`). Raises ``ValueError`` saying what is
    wrong; ``sha256`` is checked with it because what it may pin depends on the source."""
    if sha256 is not None and not _HEX64.fullmatch(sha256):
        raise ValueError(f"sha256 must be 64 lowercase hex digits, got {sha256!r}")
    if text.startswith("hf://"):
        parts = text[len("hf://") :].split("/")
        if len(parts) < 2 or not parts[0] or not parts[1]:
            raise ValueError(f"expected hf://ORG/REPO[@REVISION][/FILE], got {text!r}")
        name, _, revision = parts[1].partition("@")
        filename = "/".join(parts[2:]) or None
        if not _HUB_PART.fullmatch(parts[0]) or not _HUB_PART.fullmatch(name):
            raise ValueError(f"{text!r}: not a valid hub repository name")
        if "@" in parts[1] and not _HUB_PART.fullmatch(revision):
            raise ValueError(f"{text!r}: not a valid revision (a branch, tag or commit; no '/')")
        if filename is not None and any(p in ("", ".", "..") for p in filename.split("/")):
            raise ValueError(f"{text!r}: not a valid file path in the repository")
        if filename is None and sha256 is not None:
            raise ValueError("sha256 pins one file; a whole repository is checked against the hub's own hashes")
        return ModelSource(SourceKind.HUB, text, f"{parts[0]}/{name}", revision or None, filename)
    if text.startswith(("https://", "http://")):
        url = urlsplit(text)
        if not url.hostname or not url.path.strip("/"):
            raise ValueError(f"{text!r}: a URL needs a host and a file path")
        if url.scheme == "http" and url.hostname not in _LOOPBACK and sha256 is None:
            raise ValueError(f"{text!r}: plain http:// needs a sha256 (or use https://)")
        return ModelSource(SourceKind.URL, text)
    path = text[len("file://") :] if text.startswith("file://") else text
    if not path.startswith("/"):
        raise ValueError(f"expected an absolute path, hf://ORG/REPO[@REVISION][/FILE] or an https:// URL, got {text!r}")
    return ModelSource(SourceKind.PATH, path)


def cache_key(source: str | None, sha256: str | None = None) -> str | None:
    """The key under which a neuron's model cache holds ``source`` (with its ``sha256``): 32
    hex digits, computed alike by the neuron (its cache's entries) and the cortex (to name
    them from its catalogue). ``None``: no source, or a path used in place (never cached)."""
    if source is None:
        return None
    parsed = parse_source(source, sha256=sha256)
    if parsed.kind is SourceKind.PATH:
        return None
    return hashlib.sha256(f"{parsed.location} {sha256 or ''}".encode()).hexdigest()[:32]


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
        source: where the model's files come from, fetched by the neuron before the
            backend loads: an absolute path on the neuron, ``hf://ORG/REPO[@REV]/FILE`` (one
            file of a hub repository), ``hf://ORG/REPO[@REV]`` (every file: EXL2 and
            safetensors directories), or an ``https://`` URL of one file (``http://`` only
            with a ``sha256``, or on loopback). The backend gets the local path as
            ``metadata["path"]``. ``None``: the backend finds its files by itself.
        sha256: the expected SHA-256 of the one file ``source`` names (lowercase hex); a
            download that does not match is refused and removed. Hub files are checked
            against the hub's own hashes in any case.
    """

    model_id: ModelId
    backend_kind: str
    command: str | None = None
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    listen_endpoint: str | None = None
    metadata: dict[str, Json] = field(default_factory=dict)
    capability: ModelCapability = field(default_factory=ModelCapability)
    source: str | None = None
    sha256: str | None = None

    def __post_init__(self) -> None:
        if not self.model_id:
            raise ValueError("model_id must not be empty")
        if not self.backend_kind:
            raise ValueError("backend_kind must not be empty")
        if self.source is not None:
            parse_source(self.source, sha256=self.sha256)
        elif self.sha256 is not None:
            raise ValueError("sha256 needs a source")

    @property
    def parsed_source(self) -> ModelSource | None:
        return None if self.source is None else parse_source(self.source, sha256=self.sha256)


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
    context_length: int | None = None
    """The context one request gets, as loaded (llama.cpp splits ``n_ctx`` across its
    slots); ``None`` when the backend does not say."""
    cached: bool | None = None
    """Whether the model's source is in the neuron's cache (``None``: it has no source to
    fetch, or a path used in place)."""
