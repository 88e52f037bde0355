"""What a compromised or buggy neuron's names and text do (:mod:`hostile_neuron`): a node
id no log line can carry is refused at the hello, and the model ids, error texts and answers
it sends reach the operator's terminal (``helexa status``, ``models``, ``chat``) and the
cortex's log escaped, in tables that keep their shape. A real control server and gateway on
127.0.0.1:0; the CLI through click's runner."""

from __future__ import annotations

import httpx
import pytest
import trio

from helexa.protocol import GenerateResult, GpuInfo, Hardware, ModelState, ModelStatus, TokenChunk, Usage
from helexa.protocol.join import Welcomed
from helexa.roles.cortex.fleet import Fleet
from helexa.status import render_fleet
from helexa.transport import Channel
from hostile_neuron import control, hostile, until
from portals import portals
from serving import admin_headers


@pytest.mark.parametrize("node_id", ["evil\n12:00:00 INFO forged line", "", "n" * 10_000, "tab\there", "\u202eevil"])
async def test_a_node_id_no_log_line_can_carry_is_refused_at_the_hello(nursery, node_id):
    fleet = Fleet()
    url = await control(nursery, fleet)
    verdict = await nursery.start(lambda task_status: hostile(url, node_id=node_id, task_status=task_status))
    assert not isinstance(verdict, Welcomed) and verdict.code == "bad_request"
    assert len(fleet.snapshot()["neurons"]) == 0


async def test_a_model_id_with_an_escape_sequence_never_reaches_the_operators_terminal(nursery):
    from helexa.cli_models import _models_table

    fleet = Fleet()
    url = await control(nursery, fleet)
    sneaky = "\x1b[2J\x1b[Hall neurons healthy"
    nursery.start_soon(lambda: hostile(url, models=("chat", sneaky)))
    await until(lambda: "evil" in fleet and fleet.get("evil").heartbeats > 0)
    async with portals(fleet, {}) as (_, urls):
        async with httpx.AsyncClient() as http:
            fleet_view = (await http.get(urls["default"] + "/admin/fleet", headers=admin_headers())).json()
            models = (await http.get(urls["default"] + "/admin/models", headers=admin_headers())).json()["data"]
    status, listed = render_fleet(fleet_view), _models_table(models)  # helexa status, helexa models list
    # The cortex drops an unprintable model id from the neuron's reports (test_neuron_model_limits.py);
    # what the terminals show is escaped all the same (test_a_neurons_error_text_reaches_...).
    assert "\x1b" not in status and "all neurons healthy" not in status and "chat" in status
    assert "\x1b" not in listed and "all neurons healthy" not in listed


SNEAKY = "\x1b]0;owned\x07\x1b[2J\x1b[Hall neurons healthy"
"""Sets a terminal's title, clears its screen and writes a line of its own."""
FAILED = ModelStatus("chat", ModelState.FAILED, error=SNEAKY)


async def refuse_loads(channel: Channel, cmd: object) -> None:
    """A neuron's answers to provisioning: every load refused with :data:`SNEAKY` in its error."""
    from helexa.protocol import LoadModel, ProvisioningResponse, UpsertModelConfig

    if isinstance(cmd, UpsertModelConfig):
        await channel.send(ProvisioningResponse(cmd.command_id, True, status=FAILED))
    elif isinstance(cmd, LoadModel):
        await channel.send(ProvisioningResponse(cmd.command_id, False, "load failed " + SNEAKY, "load_failed", FAILED))


async def test_a_neurons_error_text_reaches_the_operators_terminal_escaped(nursery, tmp_path):
    from click.testing import CliRunner

    from helexa.cli import main
    from serving import ADMIN_TOKEN

    fleet = Fleet()
    url = await control(nursery, fleet)
    nursery.start_soon(lambda: hostile(url, statuses=(FAILED,), commands=refuse_loads))
    await until(lambda: "evil" in fleet and fleet.get("evil").heartbeats > 0)
    token = tmp_path / "admin-token"
    token.write_text(ADMIN_TOKEN)
    async with portals(fleet, {}) as (_, urls):
        def helexa(*args: str):  # noqa: ANN202
            return CliRunner().invoke(main, [*args, "--cortex", urls["default"], "--admin-token-file", str(token)])

        shown = await trio.to_thread.run_sync(helexa, "models", "show", "chat")
        loaded = await trio.to_thread.run_sync(helexa, "models", "load", "chat", "--neuron", "evil")
        unloaded = await trio.to_thread.run_sync(helexa, "models", "unload", "chat", "--neuron", "nobody\x1b[2J")
    assert shown.exit_code == 0 and loaded.exit_code == 1 and unloaded.exit_code == 1, (shown, loaded, unloaded)
    for out in (shown.stdout, loaded.stderr, unloaded.stderr):  # helexa models show, load (and an admin error)
        assert "\x1b" not in out and "\x07" not in out, out
    assert "evil: failed, in flight 0 (\\x1b]0;owned\\x07\\x1b[2J" in shown.stdout
    assert "load failed \\x1b]0;owned\\x07" in loaded.stderr
    assert "nobody\\x1b[2J" in unloaded.stderr


async def test_a_neurons_error_text_reaches_the_cortexs_log_escaped(nursery):
    import io

    from helexa import logs

    fleet = Fleet()
    url = await control(nursery, fleet)
    nursery.start_soon(lambda: hostile(url, statuses=(FAILED,), commands=refuse_loads))
    await until(lambda: "evil" in fleet and fleet.get("evil").heartbeats > 0)
    for fmt in ("text", "json"):
        out = io.StringIO()
        logs.setup("info", fmt, stream=out)
        try:
            async with portals(fleet, {}) as (_, urls), httpx.AsyncClient() as http:
                refused = await http.post(urls["default"] + "/admin/models/chat/load", json={"neuron": "evil"},
                                          headers=admin_headers())
                assert refused.status_code == 200 and "load failed" in refused.text  # the stream's error event
        finally:
            logs.setup("info")
        text = out.getvalue()
        assert "load failed" in text, fmt  # logged (the provisioner's warning)...
        assert "\x1b" not in text and "\x07" not in text, (fmt, text)  # ...with no escape a terminal would obey


async def test_an_answer_with_escape_sequences_reaches_helexa_chats_terminal_escaped(nursery):
    from click.testing import CliRunner

    from helexa.cli import main

    async def sneaky(channel: Channel, request) -> None:
        await channel.send(TokenChunk(request.request_id, "Paris\x1b]0;owned\x07", tokens=1))
        await channel.send(TokenChunk(request.request_id, "\x1b[2J\nis\tthe capital.", tokens=1))
        await channel.send(GenerateResult(request.request_id, "stop", Usage(1, 2, 0)))

    fleet = Fleet()
    url = await control(nursery, fleet)
    nursery.start_soon(hostile, url, sneaky)
    await until(lambda: "evil" in fleet)
    async with portals(fleet, {}) as (_, urls):
        args = ["chat", "--gateway", urls["default"], "--model", "chat", "--max-tokens", "8", "hi"]
        said = await trio.to_thread.run_sync(lambda: CliRunner().invoke(main, args))
    assert said.exit_code == 0, said.output
    assert "\x1b" not in said.stdout and "\x07" not in said.stdout
    assert said.stdout == "Paris\\x1b]0;owned\\x07\\x1b[2J\nis\tthe capital.\n"  # lines and tabs as they were


async def test_long_and_wide_names_from_a_neuron_keep_helexa_status_and_models_list_tables(nursery):
    from helexa.cli_models import _models_table
    from helexa.status import columns

    fleet = Fleet()
    url = await control(nursery, fleet)
    hardware = Hardware(cpu_cores=4, ram_total=8 << 30, gpus=(GpuInfo(0, "G" * 5000, 8 << 30, 4 << 30),))
    nursery.start_soon(lambda: hostile(url, node_id="节点一", models=("chat", "M" * 256), hardware=hardware))
    nursery.start_soon(lambda: hostile(url, node_id="n2"))
    await until(lambda: all(n in fleet and fleet.get(n).heartbeats > 0 for n in ("节点一", "n2")))
    async with portals(fleet, {}) as (_, urls):
        async with httpx.AsyncClient() as http:
            fleet_view = (await http.get(urls["default"] + "/admin/fleet", headers=admin_headers())).json()
            models = (await http.get(urls["default"] + "/admin/models", headers=admin_headers())).json()["data"]
    status, listed = render_fleet(fleet_view), _models_table(models)  # helexa status, helexa models list
    for out in (status, listed):  # every line was 5,000 columns wide (model ids: 256 at most now)
        assert max(columns(line) for line in out.splitlines()) < 500, out
    assert "M" * 95 + "…" in status and "M" * 95 + "…" in listed and "G" * 95 + "…" in status
    # a wide node id (two terminal columns a character) keeps the next column lined up
    lines = [line for line in status.splitlines() if not line.startswith("cortex ")]  # the table, not the version
    assert len({columns(line[:line.index(word)]) for line, word in zip(lines, ("HEALTH", "healthy", "healthy"))}) == 1
