"""A node id's binding is made durably or not at all (a real cortex and real neuron agents in
this process, websocket control plane on 127.0.0.1, the admin API over HTTP).

The cortex binds a node id to the identity key of its first join in
``DATA_DIR/neuron-keys.json``. When that file could not be written the binding was held in
memory only, with an error logged, and the neuron admitted: after a restart of the cortex
any other key could bind the id. Now the join is turned away to retry (close 1013, try again
later: the neuron redials on its backoff, it does not exit), the cortex logs one error per
attempt and holds nothing, and the neuron joins once the file can be written.

The file is made unwritable by putting a directory at its path: the tests run as root,
which permissions do not stop, and a rename over a directory fails for root too."""

from __future__ import annotations

import json
import logging
import threading

import pytest
import trio
import trio.testing

from helexa import secret_files
from helexa.roles.cortex import neuron_keys
from helexa.roles.cortex.control_server import BINDING_UNSAVED
from helexa.roles.cortex.neuron_keys import NeuronKeys

from test_neuron_identity import Setup, key_of


async def test_a_binding_that_cannot_be_written_turns_the_join_away_to_retry(tmp_path, nursery, caplog):
    caplog.set_level(logging.INFO)
    s = Setup(tmp_path)
    cortex = await s.start_cortex(nursery)
    path = neuron_keys.path_in(tmp_path / "cortex")
    path.mkdir()  # the bindings file cannot be written
    real = s.start(nursery, "real")
    with trio.fail_after(10):
        while cortex.control.refusals < 3:
            await trio.sleep(0.02)
    # Still retrying, not exited; nothing bound, nothing admitted.
    assert real.error is None and real.neuron.joins == 0 and not real.neuron.joined.is_set()
    assert cortex.neuron_keys.bound("n1") is None and len(cortex.neuron_keys) == 0
    assert cortex.fleet.get("n1") is None
    assert cortex.control.failed_joins.retry_after("127.0.0.1", trio.current_time()) == 0  # the proof was right
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.endswith("control_server")]
    assert errors and "cannot record the binding of node id n1" in errors[0].getMessage()
    assert str(path) in errors[0].getMessage() and "the neuron retries" in errors[0].getMessage()
    token = (tmp_path / "cortex" / "join-token").read_text().strip()
    assert all(token not in r.getMessage() for r in caplog.records)
    told = [r.getMessage() for r in caplog.records if r.name.endswith("neuron.connection")
            and r.levelno == logging.WARNING]
    assert told and BINDING_UNSAVED in told[0] and "retrying" in told[0]

    path.rmdir()  # the operator fixes the data directory: the next retry joins and binds durably
    await s.joined(real)
    mine = key_of(tmp_path / "real").public_bytes
    assert cortex.neuron_keys.bound("n1") == mine
    assert json.loads(path.read_text())["bindings"]["n1"]["public_key"] == mine.hex()
    assert (await s.chat()).status_code == 200


async def test_enrolling_a_key_that_cannot_be_written_binds_nothing(tmp_path, nursery):
    s = Setup(tmp_path)
    cortex = await s.start_cortex(nursery)
    neuron_keys.path_in(tmp_path / "cortex").mkdir()
    async with s.admin() as admin:
        r = await admin.post("/admin/neurons/keys/n1/enrol", json={"public_key": "ab" * 32})
        assert r.status_code == 503 and "could not write its bindings file" in r.json()["error"]["message"]
        assert (await admin.get("/admin/neurons/keys")).json()["data"] == []
    assert cortex.neuron_keys.bound("n1") is None


async def test_the_store_changes_nothing_in_memory_when_the_file_cannot_be_written(tmp_path, monkeypatch):
    path = tmp_path / "neuron-keys.json"
    keys = NeuronKeys(path)
    assert await keys.bind("n1", b"a" * 32)
    path.unlink()
    path.mkdir()
    with pytest.raises(OSError):
        await keys.bind("n2", b"b" * 32)
    assert keys.bound("n2") is None and len(keys) == 1
    with pytest.raises(OSError):
        await keys.forget("n1")
    assert keys.bound("n1") == b"a" * 32  # as on disk: the forget did not happen

    # A join of the same key that comes while the first bind's write is under way waits for
    # it, and is turned away too when it fails (not admitted on a binding about to vanish).
    write, go = secret_files.write, threading.Event()

    def held_write(*args: object) -> None:
        go.wait(10)
        write(*args)

    monkeypatch.setattr(secret_files, "write", held_write)
    outcomes: list[object] = []

    async def bind() -> None:
        try:
            outcomes.append(await keys.bind("n3", b"c" * 32))
        except OSError as exc:
            outcomes.append(exc)

    for fixed in (False, True):
        if fixed:
            path.rmdir()
        go.clear()
        async with trio.open_nursery() as both:
            both.start_soon(bind)
            await trio.testing.wait_all_tasks_blocked()
            assert keys.bound("n3") == b"c" * 32  # held in memory while it is being written
            both.start_soon(bind)
            await trio.testing.wait_all_tasks_blocked()
            assert outcomes[2 * fixed:] == []  # the second waits for the first's write
            go.set()
    assert len(outcomes) == 4 and all(isinstance(o, OSError) for o in outcomes[:2])
    assert outcomes[2:] == [True, False] and NeuronKeys(path).bound("n3") == b"c" * 32


async def test_a_cortex_that_cannot_read_its_join_token_tells_the_neuron_to_retry_not_to_exit(tmp_path, nursery,
                                                                                             caplog):
    # The token file unreadable (mid-rotation, a mount not yet there) is the cortex's fault:
    # a Refused frame made the neuron exit 3, which systemd does not restart.
    caplog.set_level(logging.INFO)
    s = Setup(tmp_path)
    cortex = await s.start_cortex(nursery)
    token_file = tmp_path / "cortex" / "join-token"
    real = s.start(nursery, "real")  # reads the token before it goes
    token = token_file.read_text()
    token_file.unlink()
    token_file.mkdir()
    with trio.fail_after(10):
        while cortex.control.refusals < 3:
            await trio.sleep(0.02)
    assert real.error is None and real.neuron.joins == 0 and cortex.fleet.get("n1") is None
    assert cortex.control.failed_joins.retry_after("127.0.0.1", trio.current_time()) == 0
    told = [r.getMessage() for r in caplog.records if r.name.endswith("neuron.connection")
            and r.levelno == logging.WARNING]
    assert told and "cannot read its join token" in told[0] and "retrying" in told[0]

    token_file.rmdir()
    token_file.write_text(token)
    await s.joined(real)
    assert (await s.chat()).status_code == 200
