"""A cortex stopping gracefully, seen by an operator: an admin action streaming its progress
(``helexa models load``) ends with a line that says why, and a second signal during the
drain (an impatient ``kill``, a second Ctrl-C) changes nothing, on the cortex or a neuron.

Before: the load's NDJSON body was cut mid-stream past the grace (``helexa models load``
said it could not reach the cortex), and the second signal, left unread, was delivered
again once the drain ended: the process died of it (exit 143 for SIGTERM, 1 and
``Aborted!`` for SIGINT) instead of exiting 0."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import httpx
import pytest

from procs import ProcGroup

pytestmark = pytest.mark.slow

MODELS = """
[models.slow]
backend = "synthetic"
[models.slow.config]
metadata = { tokens = 2000, tokens_per_second = 50 }

[models.heavy]
backend = "synthetic"
[models.heavy.config]
metadata = { load_seconds = 60, load_steps = 60 }
"""

CONFIG = """
shutdown_grace = 1.0
"""


def test_a_load_streaming_its_progress_ends_with_a_shutting_down_line(tmp_path) -> None:
    with ProcGroup(tmp_path) as procs:
        cortex = procs.cortex(models=MODELS, config=CONFIG)
        procs.neuron(cortex, "n1")
        lines: list[str] = []
        errors: list[BaseException] = []

        def load() -> None:
            try:
                with httpx.stream("POST", cortex.gateway_url + "/admin/models/heavy/load", json={"neuron": "n1"},
                                  headers={"authorization": f"Bearer {cortex.admin_token}"}, timeout=30) as r:
                    for line in r.iter_lines():  # raises on a body cut short
                        if line.strip():
                            lines.append(line)
            except BaseException as exc:  # noqa: BLE001 - the test reads it
                errors.append(exc)

        reader = threading.Thread(target=load)
        reader.start()
        deadline = time.monotonic() + 15
        while not any('"progress"' in line for line in lines):
            assert time.monotonic() < deadline, (lines, errors)
            time.sleep(0.05)
        cortex.terminate()
        reader.join(20)
        assert not errors, errors
        events = [json.loads(line) for line in lines]
        assert events[-1] == {"event": "end", "ok": False}
        assert events[-2]["event"] == "error" and events[-2]["code"] == "shutting_down", events[-3:]
        assert events[-2]["neuron"] == "n1"
        assert cortex.popen.wait(15) == 0


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_during_the_drain_still_ends_in_a_clean_exit(tmp_path, second: signal.Signals) -> None:
    with ProcGroup(tmp_path) as procs:
        cortex = procs.cortex(models=MODELS, config=CONFIG)
        neuron = procs.neuron(cortex, "n1", config="shutdown_grace = 2.0\n")
        got: list[str] = []

        def stream() -> None:
            with httpx.stream("POST", cortex.gateway_url + "/v1/chat/completions", timeout=30,
                              json={"model": "slow", "stream": True,
                                    "messages": [{"role": "user", "content": "x"}]}) as r:
                got.extend(line for line in r.iter_lines() if line.strip())

        client = threading.Thread(target=stream)
        client.start()
        deadline = time.monotonic() + 15
        while len(got) < 3:
            assert time.monotonic() < deadline, got
            time.sleep(0.05)
        # the neuron first: its drain waits for the stream (its grace), then the cortex's
        neuron.popen.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        neuron.popen.send_signal(second)
        client.join(20)
        assert neuron.popen.wait(15) == 0, neuron.tail()
        assert "already draining" in neuron.log()

        client = threading.Thread(target=stream)
        got.clear()
        procs.neuron(cortex, "n2")
        client.start()
        deadline = time.monotonic() + 15
        while len(got) < 3:
            assert time.monotonic() < deadline, got
            time.sleep(0.05)
        cortex.terminate()
        time.sleep(0.3)
        cortex.popen.send_signal(second)
        client.join(20)
        assert "shutting_down" in got[-1]
        assert cortex.popen.wait(15) == 0, cortex.tail()
        assert "already stopping" in cortex.log() and "cortex stopped" in cortex.log()


def test_a_request_waiting_for_a_load_on_a_neuron_that_starts_draining_gets_no_capacity_at_once(tmp_path) -> None:
    """docs/operations.md: a request waiting for a model that no neuron left can hold (its only
    one is draining) gets ``503 no_capacity`` at once. One waiting for the model's cold load on
    the neuron that began to drain waited until that neuron had gone (its grace, and its
    unloads), then got ``503 load_failed``, "could not be loaded; the operator has been told":
    no load had failed. The cortex now gives the load up when the neuron says it is going."""
    with ProcGroup(tmp_path) as procs:
        cortex = procs.cortex(models=MODELS, config=CONFIG)
        neuron = procs.neuron(cortex, "n1", config="shutdown_grace = 5.0\n")
        answers: list[tuple[httpx.Response, float]] = []

        def ask() -> None:
            r = httpx.post(cortex.gateway_url + "/v1/chat/completions", timeout=60,
                           json={"model": "heavy", "messages": [{"role": "user", "content": "x"}]})
            answers.append((r, time.monotonic()))

        client = threading.Thread(target=ask)
        client.start()
        cortex.wait_for(lambda _: "loading heavy on n1" in cortex.log(), "the cold load")
        time.sleep(0.5)
        t0 = time.monotonic()
        neuron.popen.send_signal(signal.SIGTERM)
        client.join(30)
        (r, at), = answers
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_capacity", r.text
        assert r.headers["retry-after"]
        assert at - t0 < 3, at - t0  # not after the neuron's 5 s grace
        assert neuron.popen.wait(20) == 0


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/chat"])
def test_a_client_still_sending_its_body_past_the_grace_gets_a_503_in_its_apis_shape(tmp_path, path: str) -> None:
    """A request whose head had come and whose body was still coming when the grace ended
    had its connection closed with no answer at all (``shutdown_grace`` plus 2 s after the
    SIGTERM); it now gets the 503 ``shutting_down`` every other unfinished request gets."""
    with ProcGroup(tmp_path) as procs:
        cortex = procs.cortex(models=MODELS, config=CONFIG)
        host, port = cortex.gateway_url.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=20) as s:
            s.sendall(f"POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
                      f"content-length: 100\r\n\r\n{{\"model\":".encode())
            time.sleep(0.5)
            cortex.terminate()
            got = b""
            while chunk := s.recv(65536):
                got += chunk
        head, _, body = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503"), got[:300]
        assert b"retry-after:" in head.lower()
        error = json.loads(body)["error"]
        assert (error if path.startswith("/api/") else error["message"]) == "the cortex is stopping: retry shortly"
        assert cortex.popen.wait(15) == 0
