"""Strict enrolment between a real cortex and real neuron agents in this process (websocket
control plane on 127.0.0.1, synthetic backend, the admin API over HTTP).

With trust on first use anyone holding the join token could claim a node id the cortex had
never seen. Under ``enrolment = "strict"`` a node id bound to no key is refused in the
handshake (the neuron stops: no retrying), until the operator enrols the neuron's key through
``POST /admin/neurons/keys/NODE_ID/enrol``; the setting applies live on reload."""

from __future__ import annotations

import pytest
import trio

from helexa.protocol.join_identity import NOT_ENROLLED
from helexa.roles.cortex.node import Cortex
from helexa.roles.neuron.agent import JoinRefused

from test_neuron_identity import Setup, key_of


def strict(s: Setup) -> Setup:
    s.config = s.config.model_copy(update={"enrolment": "strict"})
    return s


async def test_strict_refuses_an_unenrolled_neuron_and_it_stops_trying(tmp_path, nursery):
    s = strict(Setup(tmp_path))
    cortex = await s.start_cortex(nursery)
    with pytest.raises(JoinRefused) as refused, trio.fail_after(10):
        await s.neuron("new").run()  # the join token, but no enrolled key
    assert refused.value.code == NOT_ENROLLED
    message = str(refused.value)
    assert "node id 'n1' is not enrolled on this cortex" in message
    assert "`helexa neuron-key`" in message and "`helexa neurons enrol n1 KEY`" in message
    assert cortex.fleet.get("n1") is None and cortex.neuron_keys.bound("n1") is None  # nothing bound by trying
    assert cortex.control.failed_joins.retry_after("127.0.0.1", trio.current_time()) == 0  # the proof was right


async def test_an_enrolled_neuron_joins_under_strict_and_serves(tmp_path, nursery):
    s = strict(Setup(tmp_path))
    cortex = await s.start_cortex(nursery)
    key = key_of(tmp_path / "real")  # made before the neuron starts, as `helexa neuron-key` does
    async with s.admin() as admin:
        made = await admin.post("/admin/neurons/keys/n1/enrol", json={"public_key": key.public_bytes.hex()})
        assert made.status_code == 200, made.text
        assert made.json() | {"bound_at": 0} == {"node_id": "n1", "fingerprint": key.fingerprint, "bound_at": 0,
                                                 "public_key": key.public_bytes.hex(), "enrolled": True}
        again = await admin.post("/admin/neurons/keys/n1/enrol", json={"public_key": " " + key.public_bytes.hex()})
        assert again.status_code == 200 and again.json()["enrolled"] is False  # the same key: nothing to do
    real = s.start(nursery, "real")
    await s.joined(real)
    assert (await s.chat()).status_code == 200
    with pytest.raises(JoinRefused) as refused, trio.fail_after(10):
        await s.neuron("other", "n2").run()  # enrolling n1 enrolled no other node id
    assert refused.value.code == NOT_ENROLLED
    assert cortex.fleet.get("n1").connected


@pytest.mark.parametrize("body, problem", [
    ({"public_key": "abcd"}, "is not an Ed25519 public key of 64 hex digits"),
    ({"public_key": "zz" * 32}, "is not an Ed25519 public key"),
    ({"public_key": 7}, "give the neuron's identity key as 64 hex digits"),
    ({}, "give the neuron's identity key as 64 hex digits"),
])
async def test_enrolling_a_malformed_key_is_a_400_naming_it(tmp_path, nursery, body, problem):
    s = Setup(tmp_path)
    cortex = await s.start_cortex(nursery)
    async with s.admin() as admin:
        r = await admin.post("/admin/neurons/keys/n1/enrol", json=body)
        assert r.status_code == 400
        error = r.json()["error"]
        assert error["param"] == "public_key" and problem in error["message"]
        r = await admin.post("/admin/neurons/keys/n1/enrol", content=b"{no json")
        assert r.status_code == 400 and r.json()["error"]["param"] == "body"
        r = await admin.post("/admin/neurons/keys/n1/enrol", json={"public_key": "ab" * 32},
                             headers={"authorization": "Bearer no"})
        assert r.status_code == 401
    assert cortex.neuron_keys.bound("n1") is None


async def test_enrolling_over_another_key_is_a_409_until_forgotten(tmp_path, nursery):
    s = Setup(tmp_path)  # first_join: the neuron binds its own key
    cortex = await s.start_cortex(nursery)
    real = s.start(nursery, "real")
    await s.joined(real)
    mine, other = key_of(tmp_path / "real"), key_of(tmp_path / "other")
    async with s.admin() as admin:
        r = await admin.post("/admin/neurons/keys/n1/enrol", json={"public_key": other.public_bytes.hex()})
        assert r.status_code == 409
        error = r.json()["error"]
        assert error["code"] == "bound_to_another_key" and error["param"] == "node_id"
        assert mine.fingerprint in error["message"] and "`helexa neurons forget n1`" in error["message"]
        assert cortex.neuron_keys.bound("n1") == mine.public_bytes
        assert (await admin.post("/admin/neurons/keys/n1/forget")).status_code == 200
        r = await admin.post("/admin/neurons/keys/n1/enrol", json={"public_key": other.public_bytes.hex()})
        assert r.status_code == 200 and r.json()["enrolled"] is True
        slashed = await admin.post("/admin/neurons/keys/gpu%2F1/enrol", json={"public_key": mine.public_bytes.hex()})
        assert slashed.status_code == 200 and slashed.json()["node_id"] == "gpu/1"
        assert (await admin.get("/admin/neurons/keys/n1/enrol")).headers["allow"] == "POST"
    assert cortex.neuron_keys.bound("n1") == other.public_bytes


async def test_strict_enrolment_applies_on_reload_to_the_joins_that_follow(tmp_path, nursery):
    s = Setup(tmp_path)
    config = s.config
    s.cortex = cortex = Cortex(config, loader=lambda: config.model_copy(update={"enrolment": "strict"}))
    s.addrs = await nursery.start(cortex.run)
    first = s.start(nursery, "first")  # joined under first_join: bound to its key
    await s.joined(first)
    report = cortex.reload()
    assert "enrolment" in report.live and "enrolment" not in report.restart
    with pytest.raises(JoinRefused) as refused, trio.fail_after(10):
        await s.neuron("second", "n2").run()
    assert refused.value.code == NOT_ENROLLED
    assert cortex.fleet.get("n1").connected and first.error is None  # a neuron joined stays
