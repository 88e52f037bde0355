"""The ``neuron.queue`` span: how long a request waited on the neuron before its backend
started on it.

It begins when the neuron takes the request for its model (in the request's own task,
under the ``neuron.generate`` / ``neuron.embed`` span) and ends at the first of:

* ``backend_start``: the backend said the engine started on the request
  (:mod:`helexa.runtime.start_signal`). For ``llama_cpp`` that is llama.cpp's first
  prompt-progress report, sent when a slot takes the request, so the wait covers its own
  slot queue; for ``embeddings`` it is the one ONNX batch at a time being free; for a model
  in a worker process it is when the neuron hears that from the worker, so the hand-off to
  the worker and back is inside the wait. ``synthetic`` has no queue and reports at once.
* ``first_output``: the first token of a stream went out (backends that do not report a
  start: the wait then also holds the prompt's processing);
* ``result``: the whole answer came back without either (a non-streaming request, or an
  embedding, on a backend that does not report a start);
* ``failed``: the request ended in an error, or was cancelled, before any of these.

Attributes: ``helexa.model``, ``helexa.request_id``, ``helexa.queue.busy_at_entry`` (the
model's requests already in flight on this neuron when this one arrived: with
``helexa.queue.slots`` at or below it, the request had to wait for a slot),
``helexa.queue.slots`` (requests the backend runs at once, when it says),
``helexa.queue.wait_ms`` and ``helexa.queue.ended_by`` (one of the above).
"""

from __future__ import annotations

import trio

from helexa import telemetry


class QueueWait:
    """One request's ``neuron.queue`` span, begun now under the current span."""

    __slots__ = ("_span", "_since")

    def __init__(self, *, request_id: str, model_id: str, busy: int, slots: int | None) -> None:
        attributes: dict[str, str | int] = {"helexa.request_id": request_id, "helexa.model": model_id,
                                            "helexa.queue.busy_at_entry": busy}
        if slots is not None:
            attributes["helexa.queue.slots"] = slots
        self._since = trio.current_time()
        self._span = telemetry.tracer().start_span("neuron.queue", attributes=attributes)

    @property
    def ended(self) -> bool:
        return not self._span.is_recording()

    def end(self, ended_by: str) -> None:
        """End the wait (``backend_start``, ``first_output``, ``result`` or ``failed``); a
        second call does nothing."""
        if self.ended:
            return
        self._span.set_attribute("helexa.queue.wait_ms", round((trio.current_time() - self._since) * 1000, 3))
        self._span.set_attribute("helexa.queue.ended_by", ended_by)
        self._span.end()
