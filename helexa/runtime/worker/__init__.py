"""Models in worker processes: each loaded model runs in a child process of the neuron.

- :mod:`.proxy`: :class:`WorkerBackend`, the neuron's side (a :class:`~helexa.runtime.Backend`
  that forwards every request to the worker and routes its frames back by request id);
- :mod:`.process`: :class:`~.process.WorkerProcess`, the worker's supervision from the
  neuron (spawn, load, pings, kill on a missed deadline, reaping, why it died);
- :mod:`.child`: the worker's side (``python -m helexa.runtime.worker``), the ordinary
  backend inside its own trio loop;
- :mod:`.pipe`: framed messages over the socketpair between them (the frames are
  :mod:`helexa.protocol.worker`'s).

Which models run in a worker (:func:`isolated`): a config's ``metadata.isolate`` (a bool)
decides; without it, every backend kind does except the two for which a process of their
own buys nothing and costs a hop per request:

- ``openai_proxy``: its engine is already a supervised process of its own; the proxy only
  relays HTTP, never holds the interpreter lock for long and cannot crash natively.
- ``synthetic``: no model, for load tests of the fabric; a worker would only add the hop.

``llama_cpp`` (xllamacpp holds the interpreter lock for a whole load and can crash in native
code), ``embeddings`` (onnxruntime) and ``exllamav2`` (CUDA, torch) run in workers.
"""

from __future__ import annotations

from helexa.protocol import ModelConfig

from ..base import Backend, LoadFailed, cancel_grace
from ..registry import BACKENDS, create_backend
from .process import WorkerSettings
from .proxy import WorkerBackend

IN_PROCESS_KINDS = frozenset({"openai_proxy", "synthetic"})
"""Backend kinds that run in the neuron's own process unless ``metadata.isolate`` says."""


def isolated(config: ModelConfig) -> bool:
    """Whether ``config``'s model runs in a worker process (see the module docstring).

    Raises :class:`LoadFailed` (``invalid_config``) when ``metadata.isolate`` is not a bool.
    """
    flag = config.metadata.get("isolate")
    if flag is None:
        return config.backend_kind not in IN_PROCESS_KINDS
    if not isinstance(flag, bool):
        raise LoadFailed(f"metadata.isolate must be true or false, got {flag!r}", code="invalid_config")
    return flag


def backend_for(config: ModelConfig, settings: WorkerSettings | None = None) -> Backend:
    """The backend the neuron runs ``config`` with: a :class:`WorkerBackend` when
    :func:`isolated`, else the in-process one. An unknown kind fails here, at once."""
    if config.backend_kind not in BACKENDS or not isolated(config):
        cancel_grace(config)  # refused at the load, as a worker's is, not at a cancel's
        return create_backend(config)
    return WorkerBackend(config, settings)


__all__ = ["IN_PROCESS_KINDS", "WorkerBackend", "WorkerSettings", "backend_for", "isolated"]
