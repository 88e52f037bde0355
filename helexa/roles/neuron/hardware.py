"""What this machine has (CPU, RAM, NVIDIA GPUs through NVML) and how busy it is.

NVML is optional: without a driver (or without ``nvidia-ml-py``) the GPU list is empty and
nothing fails.
"""

from __future__ import annotations

import logging
import os
import platform
import socket

import psutil

from helexa.protocol import GpuInfo, GpuUsage, Hardware, NeuronMetrics

log = logging.getLogger(__name__)


def _nvml():
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # no library, no driver, no device: all mean "no NVIDIA GPU here"
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def discover_gpus() -> tuple[GpuInfo, ...]:
    nv = _nvml()
    if nv is None:
        return ()
    gpus = []
    try:
        for i in range(nv.nvmlDeviceGetCount()):
            h = nv.nvmlDeviceGetHandleByIndex(i)
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            name = nv.nvmlDeviceGetName(h)
            major, minor = nv.nvmlDeviceGetCudaComputeCapability(h)
            uuid = nv.nvmlDeviceGetUUID(h)
            gpus.append(
                GpuInfo(
                    index=i,
                    name=name.decode() if isinstance(name, bytes) else name,
                    vram_total=int(mem.total),
                    vram_free=int(mem.free),
                    compute_capability=f"{major}.{minor}",
                    uuid=uuid.decode() if isinstance(uuid, bytes) else uuid,
                )
            )
    except Exception as exc:
        log.warning("NVML query failed: %s", exc)
    return tuple(gpus)


def discover() -> Hardware:
    return Hardware(
        cpu_cores=os.cpu_count() or 1,
        ram_total=psutil.virtual_memory().total,
        cpu_model=_cpu_model(),
        platform=f"{platform.system()} {platform.machine()}",
        gpus=discover_gpus(),
    )


def hostname() -> str:
    return socket.gethostname()


class MetricsSampler:
    """Samples CPU, RAM and per-GPU memory for heartbeats (cheap enough for 1 s intervals)."""

    def __init__(self) -> None:
        self._nv = _nvml()
        psutil.cpu_percent(None)  # prime the counter: the first call always returns 0

    def sample(self, *, in_flight: int = 0, queued: int = 0) -> NeuronMetrics:
        vm = psutil.virtual_memory()
        return NeuronMetrics(
            cpu_percent=psutil.cpu_percent(None),
            ram_used=vm.total - vm.available,
            ram_total=vm.total,
            gpus=self._gpus(),
            in_flight=in_flight,
            queued=queued,
        )

    def _gpus(self) -> tuple[GpuUsage, ...]:
        nv = self._nv
        if nv is None:
            return ()
        out = []
        try:
            for i in range(nv.nvmlDeviceGetCount()):
                h = nv.nvmlDeviceGetHandleByIndex(i)
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                util = nv.nvmlDeviceGetUtilizationRates(h)
                out.append(GpuUsage(i, int(mem.used), int(mem.free), float(util.gpu)))
        except Exception as exc:
            log.debug("NVML sample failed: %s", exc)
        return tuple(out)
