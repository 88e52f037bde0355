"""What a neuron is made of, and how busy it is."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class GpuInfo:
    index: int
    name: str
    vram_total: int
    vram_free: int
    compute_capability: str = ""
    uuid: str = ""


@dataclass(frozen=True, slots=True)
class Hardware:
    cpu_cores: int
    ram_total: int
    cpu_model: str = ""
    platform: str = ""
    gpus: tuple[GpuInfo, ...] = ()


@dataclass(frozen=True, slots=True)
class GpuUsage:
    index: int
    vram_used: int
    vram_free: int
    utilization: float = 0.0


@dataclass(frozen=True, slots=True)
class NeuronMetrics:
    """Lightweight metrics carried by every heartbeat."""

    cpu_percent: float = 0.0
    ram_used: int = 0
    ram_total: int = 0
    gpus: tuple[GpuUsage, ...] = ()
    in_flight: int = 0
    queued: int = 0


@dataclass(frozen=True, slots=True)
class NeuronDescriptor:
    """A high-level description of a neuron node, sent once when it joins."""

    node_id: str
    hardware: Hardware
    hostname: str = ""
    software: str = ""
    operator: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    endpoints: tuple[str, ...] = ()
    pricing: dict[str, float] = field(default_factory=dict)
