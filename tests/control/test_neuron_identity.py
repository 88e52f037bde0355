"""A neuron's identity key, between a real cortex and real neuron agents in this process
(websocket control plane on 127.0.0.1, synthetic backend, the admin API over HTTP).

The join token alone let anyone join under another neuron's node id, and the join pushed
the real neuron out (4001) and took its traffic. Now the first key that joins as a node id
is bound to it, in the cortex's data directory: a join with another key is refused, the
real neuron keeps serving, the same neuron restarted rejoins, the operator can forget a
binding, and bindings survive a restart of the cortex."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import httpx
import pytest
import trio

from helexa import identity
from helexa.protocol.join_identity import IDENTITY_MISMATCH
from helexa.roles.cortex import neuron_keys
from helexa.roles.cortex.config import CortexConfig
from helexa.roles.cortex.neuron_keys import NeuronKeys
from helexa.roles.cortex.node import Cortex
from helexa.roles.neuron.agent import JoinRefused, Neuron, NeuronError
from helexa.roles.neuron.config import NeuronConfig

MODELS = '[models.synth]\nbackend = "synthetic"\nmemory_mb = 10\n[models.synth.config]\nmetadata = { tokens = 3 }\n'
CHAT = {"model": "synth", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}


class Running:
    """One neuron agent run in the test's nursery; what ended it, if anything did."""

    def __init__(self, neuron: Neuron) -> None:
        self.neuron = neuron
        self.error: NeuronError | None = None
        self.scope = trio.CancelScope()
        self.done = trio.Event()

    async def run(self) -> None:
        with self.scope:
            try:
                await self.neuron.run()
            except NeuronError as exc:
                self.error = exc
        self.done.set()

    async def stop(self) -> None:
        """Gone without a goodbye, as a killed process."""
        self.scope.cancel()
        await self.done.wait()


class Setup:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        (tmp / "models.toml").write_text(MODELS)
        self.config = CortexConfig(data_dir=tmp / "cortex", control_socket="127.0.0.1:0",
                                   gateway_socket="127.0.0.1:0", usage_store=":memory:",
                                   models_file=tmp / "models.toml")
        self.cortex: Cortex | None = None
        self.addrs = None

    async def start_cortex(self, nursery: trio.Nursery) -> Cortex:
        self.cortex = Cortex(self.config)
        self.addrs = await nursery.start(self.cortex.run)
        return self.cortex

    def neuron(self, data: str, node_id: str = "n1") -> Neuron:
        token = (self.tmp / "cortex" / "join-token").read_text().strip()
        return Neuron(NeuronConfig(cortex=self.addrs.control_url, node_id=node_id, join_token=token,
                                   data_dir=self.tmp / data, reconnect_initial=0.05, reconnect_max=0.2))

    def start(self, nursery: trio.Nursery, data: str, node_id: str = "n1") -> Running:
        running = Running(self.neuron(data, node_id))
        nursery.start_soon(running.run)
        return running

    async def joined(self, running: Running, joins: int = 1) -> None:
        with trio.fail_after(10):
            while running.neuron.joins < joins or not running.neuron.joined.is_set():
                assert running.error is None, running.error
                await trio.sleep(0.02)

    def admin(self) -> httpx.AsyncClient:
        token = (self.tmp / "cortex" / "admin-token").read_text().strip()
        return httpx.AsyncClient(base_url=self.addrs.admin_url, timeout=10,
                                 headers={"authorization": f"Bearer {token}"})

    async def chat(self) -> httpx.Response:
        async with httpx.AsyncClient(base_url=self.addrs.gateway_url, timeout=30) as http:
            return await http.post("/v1/chat/completions", json=CHAT)


def key_of(data_dir: Path) -> identity.Identity:
    return identity.load_or_create(data_dir / "identity.key")


async def test_a_neuron_with_the_token_but_another_key_cannot_take_a_node_id_over(tmp_path, nursery):
    s = Setup(tmp_path)
    cortex = await s.start_cortex(nursery)
    real = s.start(nursery, "real")
    await s.joined(real)
    link = cortex.fleet.get("n1")
    assert (await s.chat()).status_code == 200

    with pytest.raises(JoinRefused) as refused, trio.fail_after(10):
        await s.neuron("intruder").run()  # the same node id and join token, another key
    assert refused.value.code == IDENTITY_MISMATCH
    assert "'n1' is bound to another identity key" in str(refused.value)
    assert "helexa neurons forget n1`" in str(refused.value)

    # The real neuron was not disturbed: the same connection, still serving.
    assert cortex.fleet.get("n1") is link and link.connected and real.neuron.joins == 1
    assert (await s.chat()).status_code == 200
    await link.ping(1, timeout=5)
    assert cortex.control.failed_joins.retry_after("127.0.0.1", trio.current_time()) == 0  # no wrong proof


async def test_the_same_neuron_restarted_rejoins_and_takes_its_old_connection_over(tmp_path, nursery):
    s = Setup(tmp_path)
    cortex = await s.start_cortex(nursery)
    first = s.start(nursery, "real")
    await s.joined(first)
    old = cortex.fleet.get("n1")
    await first.stop()
    again = s.start(nursery, "real")  # the same data directory: the same key
    await s.joined(again)
    assert cortex.fleet.get("n1") is not old and again.error is None
    assert (await s.chat()).status_code == 200
    # A copy of its data directory (a cloned machine) still pushes the other out, as before.
    clone = s.start(nursery, "real")
    await s.joined(clone)
    with trio.fail_after(10):
        await again.done.wait()
    assert isinstance(again.error, JoinRefused) and again.error.code == "duplicate_node_id"
    assert "with this neuron's identity key (a copy of its data_dir)" in str(again.error)


async def test_a_new_key_bound_after_forget_pushes_the_old_neuron_out_saying_so(tmp_path, nursery):
    """After ``helexa neurons forget``, a new machine under the node id takes the connected
    old neuron's place: the old one exits naming the forgotten binding, not a cloned data_dir."""
    s = Setup(tmp_path)
    cortex = await s.start_cortex(nursery)
    old = s.start(nursery, "old", "-n 1'x")
    await s.joined(old)
    assert await cortex.neuron_keys.forget("-n 1'x") is not None
    new = s.start(nursery, "new-machine", "-n 1'x")
    await s.joined(new)
    with trio.fail_after(10):
        await old.done.wait()
    assert isinstance(old.error, JoinRefused) and old.error.code == "node_id_rebound"
    message = str(old.error)
    assert "the operator forgot this neuron's identity key" in message and "copy of its data_dir" not in message
    assert "helexa neurons forget -- '-n 1'\"'\"'x'" in message
    assert cortex.neuron_keys.bound("-n 1'x") == key_of(tmp_path / "new-machine").public_bytes
    assert new.error is None and new.neuron.joined.is_set()


async def test_the_operator_lists_and_forgets_a_binding_and_a_new_key_binds(tmp_path, nursery):
    s = Setup(tmp_path)
    cortex = await s.start_cortex(nursery)
    real = s.start(nursery, "real")
    await s.joined(real)
    link = cortex.fleet.get("n1")
    async with s.admin() as admin:
        (listed,) = (await admin.get("/admin/neurons/keys")).json()["data"]
        mine = key_of(tmp_path / "real")
        assert listed["node_id"] == "n1" and listed["fingerprint"] == mine.fingerprint
        assert listed["public_key"] == mine.public_bytes.hex() and listed["connected"] is True
        assert (await admin.post("/admin/neurons/keys/n9/forget")).status_code == 404
        assert (await admin.get("/admin/neurons/keys/n1/forget")).headers["allow"] == "POST"
        assert (await admin.post("/admin/neurons/keys/n1/explode")).status_code == 404
        await cortex.neuron_keys.bind("gpu/1", b"k" * 32)
        slashed = await admin.post("/admin/neurons/keys/gpu%2F1/forget")
        assert slashed.status_code == 200 and slashed.json()["node_id"] == "gpu/1"
        assert (await admin.post("/admin/neurons/keys/n1/forget", headers={"authorization": "Bearer no"})
                ).status_code == 401
        gone = await admin.post("/admin/neurons/keys/n1/forget")
        assert gone.status_code == 200 and gone.json()["fingerprint"] == mine.fingerprint
        assert (await admin.get("/admin/neurons/keys")).json()["data"] == []
    # Forgetting did not disconnect it.
    await trio.sleep(0.3)
    assert cortex.fleet.get("n1") is link and link.connected and real.neuron.joins == 1
    assert (await s.chat()).status_code == 200

    await real.stop()
    new_machine = s.start(nursery, "new-machine")
    await s.joined(new_machine)
    assert cortex.neuron_keys.bound("n1") == key_of(tmp_path / "new-machine").public_bytes
    with pytest.raises(JoinRefused), trio.fail_after(10):
        await s.neuron("real").run()  # now the old key is the other one


async def test_bindings_survive_a_restart_of_the_cortex(tmp_path):
    s = Setup(tmp_path)
    async with trio.open_nursery() as nursery:
        cortex = await s.start_cortex(nursery)
        real = s.start(nursery, "real")
        await s.joined(real)
        cortex.stop()
        await real.stop()
    data = json.loads(neuron_keys.path_in(tmp_path / "cortex").read_text())
    assert data["bindings"]["n1"]["public_key"] == key_of(tmp_path / "real").public_bytes.hex()
    async with trio.open_nursery() as nursery:
        await s.start_cortex(nursery)
        with pytest.raises(JoinRefused) as refused, trio.fail_after(10):
            await s.neuron("intruder").run()
        assert refused.value.code == IDENTITY_MISMATCH
        back = s.start(nursery, "real")
        await s.joined(back)
        assert (await s.chat()).status_code == 200
        s.cortex.stop()
        await back.stop()


# --- the store ----------------------------------------------------------------------------


async def test_the_store_writes_each_change_whole_and_private(tmp_path):
    path = tmp_path / "neuron-keys.json"
    keys = NeuronKeys(path, clock=lambda: 1000.0)
    assert await keys.bind("n1", b"a" * 32) and not await keys.bind("n1", b"a" * 32)
    with pytest.raises(ValueError):
        await keys.bind("n1", b"b" * 32)
    await keys.bind("n/2", b"c" * 32)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["neuron-keys.json"]  # no temporary file left
    again = NeuronKeys(path)
    assert again.bound("n1") == b"a" * 32 and again.get("n/2").bound_at == 1000.0
    assert (await again.forget("n1")).public_key == b"a" * 32 and await again.forget("n1") is None
    assert NeuronKeys(path).bound("n1") is None and len(NeuronKeys(path)) == 1


@pytest.mark.parametrize("text", ["{", '{"version": 9, "bindings": {}}',
                                  '{"version": 1, "bindings": {"n1": {"public_key": "abcd", "bound_at": 1}}}',
                                  '{"version": 1, "bindings": {"n1": "x"}}'])
def test_a_corrupt_bindings_file_is_refused_not_emptied(tmp_path, text):
    path = tmp_path / "neuron-keys.json"
    path.write_text(text)
    with pytest.raises(ValueError):
        NeuronKeys(path)
    assert path.read_text() == text


async def test_a_neuron_of_handshake_version_1_is_sent_no_cache_scope_it_could_not_decode(tmp_path, nursery,
                                                                                           monkeypatch):
    """An older neuron joins at version 1, and its codec refuses unknown fields: a keyed
    request's cache scope is left out of what it is sent, rather than breaking its link.
    A neuron at version 2 is sent the scope."""
    from functools import partial

    from helexa.protocol import GenerateRequest, Task
    from helexa.protocol.join import NeuronJoin
    from helexa.roles.neuron import connection

    s = Setup(tmp_path)
    cortex = await s.start_cortex(nursery)
    monkeypatch.setattr(connection, "NeuronJoin", partial(NeuronJoin, versions=(1, 1)))
    await s.joined(s.start(nursery, "old", "old"))
    monkeypatch.undo()
    await s.joined(s.start(nursery, "new", "new"))
    old, new = cortex.fleet.get("old"), cortex.fleet.get("new")
    assert not old.scopes_cache and new.scopes_cache
    request = GenerateRequest("r1", "synth", Task.CHAT, messages=({"role": "user", "content": "x"},),
                              cache_scope="ab" * 16)
    assert old.generate(request).request.cache_scope == ""
    assert new.generate(request).request.cache_scope == "ab" * 16


async def test_the_fleet_view_and_helexa_status_show_each_neurons_key_fingerprint(tmp_path, nursery, monkeypatch):
    """``/admin/fleet`` (and so ``helexa status --json``) carries each neuron's identity key
    fingerprint, null for an older neuron that sent none; ``helexa status`` shows it, "none"."""
    from functools import partial

    from helexa.protocol.join import NeuronJoin
    from helexa.roles.neuron import connection
    from helexa.status import render_fleet

    s = Setup(tmp_path)
    await s.start_cortex(nursery)
    monkeypatch.setattr(connection, "NeuronJoin", partial(NeuronJoin, versions=(1, 1)))
    await s.joined(s.start(nursery, "old", "old"))
    monkeypatch.undo()
    await s.joined(s.start(nursery, "new", "new"))
    async with s.admin() as admin:
        fleet = (await admin.get("/admin/fleet")).json()
    keys = {n["node_id"]: n["identity_key"] for n in fleet["neurons"]}
    mine = key_of(tmp_path / "new").fingerprint
    assert keys == {"new": mine, "old": None}
    rows = {line.split()[0]: line.split() for line in render_fleet(fleet).splitlines()}
    assert rows["NODE"][:3] == ["NODE", "HEALTH", "KEY"]
    assert rows["new"][1:3] == ["healthy", mine] and rows["old"][1:3] == ["healthy", "none"]
    del fleet["neurons"][0]["identity_key"]  # from an older cortex, which does not say
    node = fleet["neurons"][0]["node_id"]
    assert {line.split()[0]: line.split() for line in render_fleet(fleet).splitlines()}[node][2] == "?"
