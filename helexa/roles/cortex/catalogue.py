"""The model catalogue (``models.toml``): what the operator offers, and where it can run.

Format (one table per model, keyed by the id clients use)::

    [models."smollm2-135m-instruct"]
    backend = "llama_cpp"              # a neuron backend kind
    source = "hf://ORG/REPO/file.gguf" # where the neuron gets the files (see below)
    sha256 = "..."                     # optional: the expected SHA-256 of that one file
    workloads = ["chat", "completion"] # chat, completion, embedding, vision
    memory_mb = 300                    # resident memory (VRAM if min_devices > 0, else RAM)
    min_devices = 0                    # GPUs needed; 0 = runs on CPU
    min_device_vram_mb = 0             # VRAM each of those GPUs must have
    pinned_on = ["beast"]              # preferred neurons (a preference, not a restriction)
    priority = "normal"                # residency class: low < normal < high < critical
    max_context = 2048                 # the context ONE request gets (see below)
    max_output = 512
    price_in = 0.0                     # per million prompt tokens
    price_out = 0.0                    # per million completion tokens
    keep_warm = false                  # load at start-up, never unload for idleness
    idle_ttl = 900                     # seconds unused before unloading; 0 = never

    features = ["tools", "logprobs"]  # default: what the backend can (BACKEND_FEATURES)

    [models."smollm2-135m-instruct".config]   # handed to the backend (ModelConfig)
    metadata = { n_ctx = 4096 }
    # command = "...", args = [...], env = {...}, listen_endpoint = "http://..."

Everything but ``backend`` has a default.

``max_context`` is the context one request gets (prompt and answer), which is what the
gateway checks prompts against. llama.cpp splits ``n_ctx`` across its ``n_parallel`` slots
(default 2), so for a ``llama_cpp`` entry the two are kept consistent: without ``n_ctx``
the catalogue sets it to ``max_context * n_parallel``; without ``max_context`` it is
``n_ctx // n_parallel``; a ``max_context`` larger than that is refused (it would promise
requests a context they do not get). For an ``embeddings`` entry it is the most tokens an
input may have, the backend's ``max_seq_length`` (256 by default): a smaller
``max_context`` narrows it, a larger one is refused.

``features`` lists what the model can do beyond plain text (``structured_output``,
``tools``, ``logprobs``); by default what its backend can (:data:`BACKEND_FEATURES`). A
request asking for a feature its model lacks is refused at the edge with a 400. :meth:`Catalogue.load` raises
:class:`CatalogueError` naming the file and the field.

``source`` is one of: an absolute path on the neuron (used in place);
``hf://ORG/REPO[@REVISION]/FILE`` (one file of a model hub repository; the hub is
``HF_ENDPOINT`` or the neuron's ``sources.hf_endpoint``); ``hf://ORG/REPO[@REVISION]`` (the
whole repository, for EXL2 and safetensors directories); an ``https://`` URL of one file
(``http://`` only with ``sha256`` or on loopback). The neuron downloads it into its model
cache when told to load (resumable, checked against ``sha256`` and the hub's own hashes)
and hands the backend the local path as ``metadata.path``; so ``source`` and
``config.metadata.path`` are exclusive. Without ``source`` a backend finds its files by
itself (``metadata.path``, or the default model packages). Pin ``@REVISION`` for
reproducible fleets: an unpinned hub source is fetched once and then served from each
neuron's cache until evicted.
"""

from __future__ import annotations

import enum
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from helexa.logs import redact
from helexa.protocol import Feature, Hardware, ModelCapability, ModelConfig, Workload, parse_source
from helexa.protocol.model import model_id_problem

MB = 1024 * 1024

BACKEND_FEATURES: dict[str, frozenset[Feature]] = {
    "llama_cpp": frozenset({Feature.STRUCTURED_OUTPUT, Feature.TOOLS, Feature.LOGPROBS}),
    # An external server: what it can is its own; narrow it with the entry's `features`.
    "openai_proxy": frozenset({Feature.STRUCTURED_OUTPUT, Feature.TOOLS, Feature.LOGPROBS}),
    "synthetic": frozenset({Feature.LOGPROBS}),
    "exllamav2": frozenset(),
    "exllamav3": frozenset(),
    "embeddings": frozenset(),
}
"""What each backend kind can do beyond plain text: the default of an entry's ``features``
(equal to each backend class's own ``features``; a test keeps them so)."""

LLAMA_CPP_N_CTX, LLAMA_CPP_N_PARALLEL = 4096, 2
EMBEDDINGS_MAX_SEQ_LENGTH = 256
"""The ``embeddings`` backend's default ``max_seq_length`` (all-MiniLM-L6-v2's own)."""
"""The ``llama_cpp`` backend's defaults for ``n_ctx`` and ``n_parallel`` (a test keeps them equal)."""



def _config_metadata(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """A catalogue entry's ``config`` as a dict and a copy of its ``metadata``; None when
    either is malformed (the field validators then say what is wrong)."""
    config = data.get("config") or {}
    if isinstance(config, BackendConfig):
        config = config.model_dump()
    if not isinstance(config, dict) or not isinstance(config.get("metadata", {}), dict):
        return None
    return config, dict(config.get("metadata") or {})


def _embedding_context(data: dict[str, Any]) -> dict[str, Any]:
    """An ``embeddings`` entry's ``max_context`` is the most tokens an input may have: the
    backend's ``max_seq_length`` (a smaller ``max_context`` narrows it; a larger one is
    refused: the model would be promised inputs it cannot take)."""
    if (found := _config_metadata(data)) is None:
        return data
    config, metadata = found
    most, max_context = metadata.get("max_seq_length", EMBEDDINGS_MAX_SEQ_LENGTH), data.get("max_context")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (most, max_context or 1)):
        return data  # the field validators say what is wrong
    if max_context is None:
        max_context = most
    elif max_context > most:
        raise ValueError(f"max_context {max_context} is more than the model takes: max_seq_length {most}; set "
                         f"config.metadata.max_seq_length = {max_context} (if the model takes it) or "
                         f"max_context = {most}")
    metadata["max_seq_length"] = max_context
    return {**data, "max_context": max_context, "config": {**config, "metadata": metadata}}


class CatalogueError(Exception):
    """The catalogue file is missing, not TOML, or describes a model wrongly. The message is
    the first problem; ``problems`` lists every one (``helexa config check``)."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]


class Priority(enum.IntEnum):
    """Residency priority: a load may evict only models of the same or a lower class."""

    LOW = 0
    NORMAL = 1
    HIGH = 2
    CRITICAL = 3


class BackendConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    command: str | None = None
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    listen_endpoint: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class CatalogueEntry(BaseModel):
    """One model the operator offers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    backend: str = Field(min_length=1)
    workloads: tuple[Workload, ...] = (Workload.CHAT, Workload.COMPLETION)
    memory_mb: int = Field(0, ge=0)
    min_devices: int = Field(0, ge=0)
    min_device_vram_mb: int = Field(0, ge=0)
    pinned_on: tuple[str, ...] = ()
    priority: Priority = Priority.NORMAL
    max_context: int | None = Field(None, ge=1)
    max_output: int | None = Field(None, ge=1)
    price_in: float = Field(0.0, ge=0)
    price_out: float = Field(0.0, ge=0)
    keep_warm: bool = False
    idle_ttl: float = Field(0.0, ge=0)
    config: BackendConfig = Field(default_factory=BackendConfig)
    features: tuple[Feature, ...] | None = None
    owned_by: str = "helexa"
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    source: str | None = None

    @field_validator("id")
    @classmethod
    def _model_id(cls, value: str) -> str:
        # What a cortex takes from its neurons' reports (:func:`.neuron_reports.named_models`):
        # a model its neurons would report under a longer or unprintable id would be dropped.
        if (problem := model_id_problem(value)) is not None:
            raise ValueError(problem)
        return value

    @field_validator("source")
    @classmethod
    def _parse_source(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            parse_source(value, sha256=info.data.get("sha256"))
        return value

    @model_validator(mode="before")
    @classmethod
    def _context_per_request(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("backend") == "embeddings":
            return _embedding_context(data)
        if not isinstance(data, dict) or data.get("backend") != "llama_cpp":
            return data
        if (found := _config_metadata(data)) is None:
            return data
        config, metadata = found
        slots, n_ctx, max_context = metadata.get("n_parallel", LLAMA_CPP_N_PARALLEL), metadata.get("n_ctx"), \
            data.get("max_context")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (slots, n_ctx or 1, max_context or 1)):
            return data  # the field validators say what is wrong
        if n_ctx is None and max_context is not None:
            metadata["n_ctx"] = max_context * slots
        per_request = (n_ctx or LLAMA_CPP_N_CTX) // slots
        if max_context is None:
            max_context = per_request
        elif n_ctx is not None and max_context > per_request:
            raise ValueError(f"max_context {max_context} is more than one request gets: n_ctx {n_ctx} split "
                             f"across {slots} slots (n_parallel) leaves {per_request}; set config.metadata.n_ctx "
                             f"= {max_context * slots} or max_context = {per_request}")
        return {**data, "max_context": max_context, "config": {**config, "metadata": metadata}}

    @property
    def feature_set(self) -> frozenset[Feature]:
        """What the model can do beyond plain text (``features``, else its backend's)."""
        if self.features is not None:
            return frozenset(self.features)
        return BACKEND_FEATURES.get(self.backend, frozenset())

    @model_validator(mode="after")
    def _source_or_path(self) -> "CatalogueEntry":
        if self.source is None and self.sha256 is not None:
            raise ValueError("sha256 needs a source")
        if self.source is not None and "path" in self.config.metadata:
            raise ValueError("give either source or config.metadata.path, not both")
        return self

    @field_validator("priority", mode="before")
    @classmethod
    def _priority_by_name(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return Priority[value.upper()]
            except KeyError:
                names = ", ".join(p.name.lower() for p in Priority)
                raise ValueError(f"unknown priority {value!r} (one of {names})") from None
        return value

    @property
    def on_gpu(self) -> bool:
        return self.min_devices > 0

    def model_config_for_neuron(self) -> ModelConfig:
        """The :class:`ModelConfig` pushed to a neuron before loading this model."""
        return ModelConfig(
            model_id=self.id,
            backend_kind=self.backend,
            command=self.config.command,
            args=tuple(self.config.args),
            env=dict(self.config.env),
            listen_endpoint=self.config.listen_endpoint,
            metadata=dict(self.config.metadata),
            source=self.source,
            sha256=self.sha256,
            capability=ModelCapability(
                workloads=self.workloads,
                max_context=self.max_context,
                max_output=self.max_output,
                memory_mb=self.memory_mb,
                min_devices=self.min_devices,
                min_device_vram_mb=self.min_device_vram_mb,
            ),
        )

    def is_feasible_on(self, hardware: Hardware, headroom: float = 1.0) -> bool:
        """Could a neuron with this hardware ever hold the model (all memory free, of which
        placement uses the ``headroom`` share: the orchestrator's ``memory_headroom``)?

        GPU models need ``min_devices`` GPUs each with ``min_device_vram_mb`` (or, when
        that is 0, an equal share of ``memory_mb``); CPU models need ``memory_mb`` of RAM.
        Either way ``memory_mb`` must fit in the ``headroom`` share of the pool it draws
        from (:meth:`capacity_mb`), as placement counts it.
        """
        if self.capacity_mb(hardware) * headroom < self.memory_mb:
            return False
        if not self.on_gpu:
            return hardware.ram_total >= self.memory_mb * MB
        per_device = self.min_device_vram_mb or -(-self.memory_mb // self.min_devices)
        big_enough = [g for g in hardware.gpus if g.vram_total >= per_device * MB]
        return len(big_enough) >= self.min_devices

    def capacity_mb(self, hardware: Hardware) -> int:
        """The memory pool this model draws from on that hardware, in MB."""
        if self.on_gpu:
            return sum(g.vram_total for g in hardware.gpus) // MB
        return hardware.ram_total // MB


class Catalogue:
    """A set of :class:`CatalogueEntry`, looked up by id.

    Entries are immutable; the set changes only as a whole, through :meth:`replace` (a
    live reload), so every part of the cortex holding this object sees the new set at once.
    """

    def __init__(self, entries: list[CatalogueEntry] | tuple[CatalogueEntry, ...] = ()) -> None:
        self._entries = {e.id: e for e in entries}
        if len(self._entries) != len(entries):
            raise CatalogueError("duplicate model ids in the catalogue")

    def get(self, model_id: str) -> CatalogueEntry | None:
        return self._entries.get(model_id)

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._entries

    def __iter__(self) -> Iterator[CatalogueEntry]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def replace(self, other: "Catalogue") -> tuple[list[str], list[str], list[str]]:
        """Take ``other``'s entries; returns the ids ``(added, removed, changed)``."""
        old, new = self._entries, other._entries
        added = sorted(set(new) - set(old))
        removed = sorted(set(old) - set(new))
        changed = sorted(m for m in set(old) & set(new) if old[m] != new[m])
        self._entries = dict(new)
        return added, removed, changed

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "<catalogue>") -> "Catalogue":
        models = data.get("models", {})
        if not isinstance(models, dict):
            raise CatalogueError(f"{source}: [models] must be a table of model tables")
        entries, problems = [], []
        for model_id, table in models.items():
            # named in a problem's line as it can be read
            name = model_id if len(model_id) <= 64 and model_id.isprintable() else repr(model_id[:64])
            if not isinstance(table, dict):
                problems.append(f"{source}: models.{name} must be a table")
                continue
            try:
                entries.append(CatalogueEntry.model_validate({**table, "id": model_id}))
            except ValidationError as exc:
                for err in exc.errors(include_url=False):
                    loc = "".join(f".{p}" for p in err["loc"])
                    msg = redact(err["msg"].removeprefix("Value error, "))  # a source URL's secrets
                    problems.append(f"{source}: models.{name}{loc}: {msg}")
        if problems:
            raise CatalogueError(problems[0], problems)
        return cls(entries)

    @classmethod
    def load(cls, path: Path) -> "Catalogue":
        """Read a ``models.toml``. Raises :class:`CatalogueError`."""
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            raise CatalogueError(f"cannot read {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise CatalogueError(f"{path} is not valid TOML: {exc}") from None
        except UnicodeDecodeError as exc:
            raise CatalogueError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}): save it as UTF-8") \
                from None
        return cls.from_dict(data, source=str(path))


def default_catalogue() -> Catalogue:
    """The built-in catalogue used when no ``models.toml`` is given: the CPU default models."""
    return Catalogue.from_dict(
        {
            "models": {
                "smollm2-135m-instruct": {
                    "backend": "llama_cpp",
                    "memory_mb": 300,
                    "max_context": 2048,
                    "idle_ttl": 0,
                    "config": {"metadata": {"n_ctx": 4096}},  # 2 slots of 2048
                },
                "all-minilm-l6-v2": {
                    "backend": "embeddings",
                    "workloads": ["embedding"],
                    "memory_mb": 100,
                    "max_context": 256,
                },
            }
        },
        source="<built-in>",
    )
