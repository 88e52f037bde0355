"""Federation while the operators change things, as real processes: operator B (a cortex and
a neuron, ``synthetic`` backend) serving operator A (a cortex with no neuron) while B is
stopped (SIGTERM) with a federated stream under way, and while B or A reload their
configuration (``helexa reload``): prices, price caps.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from procs import HELEXA, CortexProcess, start_cortex, start_neuron, wait_until

pytestmark = pytest.mark.slow

SLOW = "synth-slow"
SLOW_TOKENS = 12
LONG = "synth-long"  # 15 s: past any grace here


def models_toml(price_out: float = 2.0) -> str:
    return f"""
[models."{SLOW}"]
backend = "synthetic"
price_in = 1.0
price_out = {price_out}
[models."{SLOW}".config]
metadata = {{ tokens = {SLOW_TOKENS}, prompt_tokens = 4, tokens_per_second = 4 }}

[models."{LONG}"]
backend = "synthetic"
price_in = 1.0
price_out = {price_out}
[models."{LONG}".config]
metadata = {{ tokens = 60, prompt_tokens = 4, tokens_per_second = 4 }}
"""


def ledger(cortex: CortexProcess) -> list[dict[str, Any]]:
    out = subprocess.run([*HELEXA, "ledger", "--data-dir", str(cortex.data_dir), "--json"],
                         capture_output=True, text=True, timeout=30, check=True)
    return json.loads(out.stdout)


def client(cortex: CortexProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=cortex.gateway_url + "/v1", api_key="unused", timeout=60, max_retries=0)


def start_pair(tmp: Path, *, a_config: str = "", b_config: str = "") -> tuple[list, CortexProcess, CortexProcess]:
    models = tmp / "models.toml"
    models.write_text(models_toml())
    (tmp / "a.toml").write_text(a_config)
    (tmp / "b.toml").write_text(b_config)
    procs: list = []
    try:
        b = start_cortex(tmp / "b", operator="op-b", models=models, config=tmp / "b.toml", mesh=True)
        procs.append(b)
        procs.append(start_neuron(b, "b-neuron"))
        a = start_cortex(tmp / "a", operator="op-a", config=tmp / "a.toml", bootstrap=b.mesh_addrs)
        procs.append(a)
        wait_until(lambda: SLOW in a.models(), 30, "A to learn B's offer", proc=a)
    except BaseException:
        for proc in reversed(procs):
            proc.stop()
        raise
    return procs, a, b


def test_a_peer_stopped_mid_federated_stream_finishes_it_within_its_grace_and_both_ledgers_agree(tmp_path) -> None:
    """SIGTERM drains a cortex's in-flight requests within ``shutdown_grace``; a peer's
    request being served is one of them. Before, the drain counted only the gateway's own
    HTTP requests: it told the neuron to stop at once, the asker's client got an error
    event (``peer_vanished`` or ``neuron_gone``) three tokens in, and the serving side's
    ledger sometimes held no receipt for what it had served."""
    procs, a, b = start_pair(tmp_path)
    try:
        text: list[str] = []
        finish: list[str | None] = []
        first = threading.Event()

        def read() -> None:
            with client(a) as cl:
                stream = cl.chat.completions.create(model=SLOW, messages=[{"role": "user", "content": "hi"}],
                                                    stream=True)
                for chunk in stream:
                    for choice in chunk.choices:
                        if choice.delta.content:
                            text.append(choice.delta.content)
                            first.set()
                        if choice.finish_reason:
                            finish.append(choice.finish_reason)

        reader = threading.Thread(target=read)
        reader.start()
        assert first.wait(30), a.tail()
        b.terminate()  # 12 tokens at 4/s: the rest comes well within B's 10 s grace
        reader.join(30)
        assert not reader.is_alive()
        assert "".join(text).split() == [f"tok{i}" for i in range(SLOW_TOKENS)]
        assert finish == ["stop"]
        assert b.stop() == 0, b.tail()
        consumed = [r for r in ledger(a) if r["direction"] == "consumed"]
        served = [r for r in ledger(b) if r["direction"] == "served"]
        assert len(consumed) == 1 and len(served) == 1, (consumed, served)
        mine, theirs = consumed[0], served[0]
        assert not mine["flagged"], mine["flag_reason"]
        for key in ("request_id", "prompt_tokens", "completion_tokens", "cost", "signature", "outcome"):
            assert mine[key] == theirs[key], key
        assert mine["outcome"] == "ok" and mine["completion_tokens"] == SLOW_TOKENS
    finally:
        for proc in reversed(procs):
            proc.stop()


def test_the_asker_stopped_past_its_grace_ends_a_federated_stream_in_its_shape_and_both_ledgers_agree(
        tmp_path) -> None:
    """A (the asking cortex) is stopped with a peer's answer streaming through it, past its
    ``shutdown_grace``. Before, its cut reached only its own neurons' streams: the peer's
    ran on until the servers closed the connections, and the client saw the body cut mid
    answer (``incomplete chunked read``) instead of the documented error event. Now it gets
    ``shutting_down`` as for a local stream, the peer a ``Cancel``, and both ledgers the
    same receipt."""
    procs, a, b = start_pair(tmp_path, a_config="shutdown_grace = 1.0\n")
    try:
        whole: list[httpx.Response] = []  # an answer not streamed waits for its first frame: the whole answer
        waiter = threading.Thread(target=lambda: whole.append(httpx.post(
            a.gateway_url + "/v1/chat/completions", timeout=30,
            json={"model": LONG, "messages": [{"role": "user", "content": "hi"}]})))
        waiter.start()
        lines: list[str] = []
        with httpx.stream("POST", a.gateway_url + "/v1/chat/completions", timeout=30,
                          json={"model": LONG, "messages": [{"role": "user", "content": "hi"}], "stream": True}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():  # raises RemoteProtocolError on a body cut short
                if line.strip():
                    lines.append(line)
                    if len(lines) == 2:
                        a.terminate()
        assert lines[-1].startswith("data: {"), lines[-3:]
        assert json.loads(lines[-1][6:])["error"]["code"] == "shutting_down"
        waiter.join(30)
        assert whole and whole[0].status_code == 503, whole  # not "Server disconnected without a response"
        assert whole[0].json()["error"]["code"] == "shutting_down"
        assert a.stop() == 0, a.tail()
        consumed = {r["request_id"]: r for r in ledger(a) if r["direction"] == "consumed"}
        served = wait_until(lambda: [r for r in ledger(b) if r["direction"] == "served"][1:] and ledger(b), 10,
                            "B's receipts", proc=b)
        assert len(consumed) == 2 and len(served) == 2, (consumed, served)
        for theirs in served:
            mine = consumed[theirs["request_id"]]
            assert not mine["flagged"], mine["flag_reason"]
            for key in ("completion_tokens", "cost", "signature", "outcome"):
                assert mine[key] == theirs[key], key
            assert mine["outcome"] == "cancelled"
    finally:
        for proc in reversed(procs):
            proc.stop()


def status_of(cortex: CortexProcess) -> tuple[int, dict[str, Any], str | None]:
    r = httpx.post(cortex.gateway_url + "/v1/chat/completions", timeout=30,
                   json={"model": SLOW, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    return r.status_code, r.json(), r.headers.get("retry-after")


def test_reloads_of_the_peers_capacity_and_of_the_askers_price_cap_route_by_the_current_state(tmp_path) -> None:
    """B's only neuron stops (its announced capacity goes to zero) and comes back; then A
    sets a price cap below B's price with ``helexa reload``, and lifts it.

    Before: a peer offering nothing at all was taken to have withdrawn its models, so A's
    clients got 404 model_not_found (an SDK does not retry it) until the neuron was back,
    as they did while a peer restarted (it announces before its neurons rejoin); and
    ``helexa reload`` answered 500 (a NameError) on any cortex started by ``helexa cortex``."""
    procs, a, b = start_pair(tmp_path, b_config="[mesh]\nannounce_interval = 1.0\n")
    try:
        assert status_of(a)[0] == 200
        neuron = procs[1]
        assert neuron.stop() == 0
        wait_until(lambda: SLOW not in a.models(), 20, "B's empty offer to reach A", proc=a)
        code, body, retry_after = status_of(a)
        assert code == 503, body
        assert body["error"]["code"] == "model_unavailable" and retry_after is not None
        procs.append(start_neuron(b, "b-neuron"))
        wait_until(lambda: SLOW in a.models(), 20, "B's offer to come back", proc=a)
        assert status_of(a)[0] == 200

        def reload(cortex: CortexProcess) -> str:
            done = subprocess.run([*HELEXA, "reload", "--cortex", cortex.admin_url, "--data-dir",
                                   str(cortex.data_dir)], capture_output=True, text=True, timeout=30)
            assert done.returncode == 0, done.stderr
            return done.stdout

        (tmp_path / "a.toml").write_text("[federation]\nmax_price_output = 1.5\n")
        assert "federation.max_price_output" in reload(a)
        code, body, _ = status_of(a)
        assert code == 403 and body["error"]["code"] == "outbound_refused", body
        (tmp_path / "a.toml").write_text("")
        reload(a)
        assert status_of(a)[0] == 200
    finally:
        for proc in reversed(procs):
            proc.stop()


def test_a_bootstrap_peer_with_a_new_identity_is_logged_in_the_operators_format_once(tmp_path) -> None:
    """B's data directory was wiped: a new identity on the old address, so A's bootstrap
    multiaddr names a peer id that is not there. A's redials (every second or three, for a
    bootstrap peer forever) each logged py-libp2p's ERROR through Python's last-resort
    handler: a bare line a second, not JSON under ``--log-format json``."""
    b = start_cortex(tmp_path / "b", operator="op-b", mesh=True)
    try:
        wrong = b.mesh_addrs[0].rsplit("/p2p/", 1)[0] + "/p2p/12D3KooWFtASMx5JeGVBjx53bY6xUYtnkFSiRD7j8FNgqZL4oz31"
        a = start_cortex(tmp_path / "a", operator="op-a", bootstrap=[wrong], extra_args=["--log-format", "json"])
        try:
            a.wait_log("failed to upgrade security", timeout=20)
            time.sleep(6)  # several redials
        finally:
            assert a.stop() == 0
        lines = [line for line in a.log().splitlines() if line.strip()]
        assert all(line.startswith("{") for line in lines), [line for line in lines if not line.startswith("{")][:3]
        records = [json.loads(line) for line in lines]
        failed = [r for r in records if "failed to upgrade security" in r["message"]]
        assert len(failed) == 1 and failed[0]["level"] == "ERROR", failed
        assert not any(r["logger"].startswith("libp2p") and r["level"] == "INFO" for r in records)
    finally:
        b.stop()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
