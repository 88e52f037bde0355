"""Federation between real processes: operator B's cortex with one neuron, operator A's
cortex (no neuron) bootstrapped to it, and operator C's, which B's policy denies.

A request to A's gateway for B's model goes A -> mesh -> B -> B's neuron and back; both
ledgers then hold the same signed receipt. The neuron runs the ``synthetic`` backend, so
the content is known exactly ("tok0 tok1 ...").
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import openai
import pytest

from procs import HELEXA, CortexProcess, start_cortex, start_neuron, wait_until

pytestmark = pytest.mark.slow

MODEL = "synth-federated"
TOKENS = 6
EXPECTED = " ".join(f"tok{i}" for i in range(TOKENS))

MODELS_TOML = f"""
[models."{MODEL}"]
backend = "synthetic"
price_in = 1.5
price_out = 3.0
[models."{MODEL}".config]
metadata = {{ tokens = {TOKENS}, prompt_tokens = 4 }}
"""

B_CONFIG = """
[federation]
deny_operators = ["op-c"]
"""


def ledger(cortex: CortexProcess) -> list[dict[str, Any]]:
    out = subprocess.run([*HELEXA, "ledger", "--data-dir", str(cortex.data_dir), "--json"],
                         capture_output=True, text=True, timeout=30, check=True)
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("federation")
    models = tmp / "models.toml"
    models.write_text(MODELS_TOML)
    (tmp / "b.toml").write_text(B_CONFIG)
    procs = []
    try:
        b = start_cortex(tmp / "b", operator="op-b", models=models, config=tmp / "b.toml", mesh=True)
        procs.append(b)
        procs.append(start_neuron(b, "b-neuron"))
        a = start_cortex(tmp / "a", operator="op-a", bootstrap=b.mesh_addrs)
        procs.append(a)
        c = start_cortex(tmp / "c", operator="op-c", bootstrap=b.mesh_addrs)
        procs.append(c)
        for asker in (a, c):
            wait_until(lambda: MODEL in asker.models(), 20, f"{asker.name} to learn B's offer", proc=asker)
        yield a, b, c
    finally:
        for proc in reversed(procs):
            proc.stop()
    for proc in procs:
        assert proc.popen.returncode == 0, proc.tail()


def client(cortex: CortexProcess) -> openai.OpenAI:
    """Use as ``with client(x) as cl``: an unclosed client's keep-alive connection would
    hold up the gateway's graceful stop."""
    return openai.OpenAI(base_url=cortex.gateway_url + "/v1", api_key="unused", timeout=30, max_retries=0)


def test_federated_model_is_listed_with_where_it_is_served(fabric) -> None:
    a, b, _ = fabric
    entry = a.models()[MODEL]
    assert entry["federated"] is True
    assert entry["operators"] == ["op-b"] and entry["peers"] == [b.peer_id]
    assert b.models()[MODEL]["federated"] is False


def test_mesh_id_prints_the_running_peer_id_and_addrs(fabric) -> None:
    a, _, _ = fabric
    out = subprocess.run([*HELEXA, "mesh", "id", "--data-dir", str(a.data_dir)], capture_output=True, text=True,
                         timeout=30, check=True).stdout.split()
    assert out == [a.peer_id, *a.mesh_addrs]


def test_chat_through_a_is_served_by_bs_neuron(fabric) -> None:
    a, _, _ = fabric
    with client(a) as cl:
        resp = cl.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert resp.choices[0].message.content == EXPECTED
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage.prompt_tokens == 4 and resp.usage.completion_tokens == TOKENS


def test_streamed_chat_through_a_is_served_by_bs_neuron(fabric) -> None:
    a, _, _ = fabric
    text, finish, usage = [], None, None
    with client(a) as cl:
        stream = cl.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                            stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                text.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
    assert "".join(text) == EXPECTED and finish == "stop"
    assert usage is not None and usage.completion_tokens == TOKENS


def test_a_peer_policy_refusal_reaches_the_client_as_403(fabric) -> None:
    _, _, c = fabric
    for stream in (False, True):
        with client(c) as cl, pytest.raises(openai.PermissionDeniedError) as info:
            cl.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=stream)
        assert info.value.status_code == 403
        error = info.value.body
        assert error["type"] == "permission_error" and error["code"] == "peer_denied"
        assert "op-c" in error["message"] and "Traceback" not in error["message"]


def test_an_unknown_model_is_still_404(fabric) -> None:
    a, _, _ = fabric
    with client(a) as cl, pytest.raises(openai.NotFoundError) as info:
        cl.chat.completions.create(model="nobody-serves-this", messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["code"] == "model_not_found"


def test_both_ledgers_hold_the_same_verified_receipts(fabric) -> None:
    a, b, c = fabric
    with client(a) as cl:
        cl.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "once more"}])

    def agreed() -> tuple[list, list] | None:
        consumed = [r for r in ledger(a) if r["direction"] == "consumed"]
        served = [r for r in ledger(b) if r["direction"] == "served"]
        return (consumed, served) if len(consumed) >= 3 and len(served) >= len(consumed) else None

    consumed, served = wait_until(agreed, 20, "receipts in both ledgers")
    by_id = {r["request_id"]: r for r in served}
    for mine in consumed:
        theirs = by_id[mine["request_id"]]
        assert not mine["flagged"] and not theirs["flagged"], (mine["flag_reason"], theirs["flag_reason"])
        for key in ("model", "prompt_tokens", "completion_tokens", "cost", "signature", "outcome",
                    "server_peer_id", "client_peer_id"):
            assert mine[key] == theirs[key], key
        assert mine["server_peer_id"] == b.peer_id and mine["client_peer_id"] == a.peer_id
        assert mine["peer_id"] == b.peer_id and theirs["peer_id"] == a.peer_id
        assert mine["completion_tokens"] == TOKENS and mine["outcome"] == "ok"
        assert mine["cost"] == pytest.approx((4 * 1.5 + TOKENS * 3.0) / 1e6)
    # C was refused before anything ran: nothing to bill, in either ledger.
    assert ledger(c) == []
    assert all(r["client_peer_id"] != c.peer_id for r in served)
    summary = subprocess.run([*HELEXA, "ledger", "--data-dir", str(a.data_dir)], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    assert "consumed" in summary and b.peer_id in summary


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
