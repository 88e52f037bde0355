"""The deadlines of reads between requests, kept by the lean HTTP server's sweep
(:mod:`helexa.roles.cortex.http.read_sweep`) rather than a cancel scope per read: an idle
keep-alive connection and a head that does not arrive whole are still cut at their limits
(exactly when alone, at most the sweep's quantum late when many fall close together), a
slow body keeps its own deadline, and bytes that arrive as a connection expires reach no
app. Real sockets on 127.0.0.1, trio's autojump clock, asserted to the virtual second.
"""

from __future__ import annotations

import trio
from trio.testing import wait_all_tasks_blocked

from raw_http import Client, echo, serving


async def _closed_after(client: Client, start: float) -> float:
    assert await client.rest() == b""
    return trio.current_time() - start


async def test_an_idle_keep_alive_connection_waits_in_the_sweep_not_in_a_scope_of_its_own(autojump_clock) -> None:
    async with serving(echo, keep_alive_timeout=75) as (server, port):
        client = await Client.connect(port)
        assert (await client.request()).status == 200
        await wait_all_tasks_blocked()
        (conn,) = server.sweep.waiting
        start = trio.current_time()
        assert conn.due == start + 75
        assert await _closed_after(client, start) == 75
        assert not server.sweep.waiting


async def test_many_idle_connections_close_at_their_keep_alive_timeout_at_most_a_quantum_late(autojump_clock) -> None:
    async with serving(echo, keep_alive_timeout=10, read_timeout=10) as (server, port):
        quantum = server.sweep.quantum
        assert quantum == 0.5
        clients, opened = [], []
        for _ in range(5):  # deadlines 0.1 s apart: closer than the quantum
            clients.append(await Client.connect(port))
            await wait_all_tasks_blocked()
            opened.append(trio.current_time())
            await trio.sleep(0.1)
        closed: dict[int, float] = {}

        async def watch(i: int) -> None:
            assert await clients[i].rest() == b""
            closed[i] = trio.current_time()

        async with trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(watch, i)
    for i in range(5):
        late = closed[i] - (opened[i] + 10)
        assert 0 <= late <= quantum + 1e-9, (i, late)
    assert closed[0] == opened[0] + 10  # the first, alone in its sweep: exactly


async def test_a_slowloris_head_is_cut_at_read_timeout_while_another_connection_is_served(autojump_clock) -> None:
    async with serving(echo, keep_alive_timeout=75, read_timeout=9.5) as (_, port):
        slow = await Client.connect(port)
        start = trio.current_time()
        busy = await Client.connect(port)

        async def trickle() -> None:
            try:
                for byte in b"GET / HTTP/1.1\r\nhost: trickle\r\nx-pad: " + b"a" * 100:
                    await slow.send(bytes([byte]))
                    await trio.sleep(1)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass

        async def keep_busy() -> None:
            while True:  # requests on another connection all along: the sweep's wait moves
                assert (await busy.request()).status == 200
                await trio.sleep(0.25)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trickle)
            nursery.start_soon(keep_busy)
            assert await _closed_after(slow, start) == 9.5
            nursery.cancel_scope.cancel()


async def test_a_slow_body_keeps_its_own_deadline_and_gets_its_408(autojump_clock) -> None:
    seen = []

    async def app(scope, receive, send) -> None:
        while (msg := await receive()).get("more_body"):
            pass
        seen.append(msg)

    async with serving(app, read_timeout=20) as (server, port):
        client = await Client.connect(port)
        await client.send(b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 10\r\n\r\nabc")
        start = trio.current_time()
        await wait_all_tasks_blocked()
        assert not server.sweep.waiting  # a read within a request is not the sweep's
        r = await client.response()
        waited = trio.current_time() - start
    assert seen == [{"type": "http.disconnect"}]
    assert r.status == 408 and waited == 20


async def test_a_request_that_arrives_as_its_connection_expires_reaches_no_app(autojump_clock) -> None:
    # The sweep expires the connection after its task was woken for the request's bytes but
    # before it ran: the closed connection drops them and calls no app.
    calls = []

    async def app(scope, receive, send) -> None:
        calls.append(scope["path"])
        await echo(scope, receive, send)

    class ExpireOnWake(trio.abc.Instrument):
        conn = None

        def before_task_step(self, task) -> None:
            conn = self.conn
            if conn is not None and task.name.endswith("HttpServer._serve"):
                self.conn = None
                conn.expire(conn.due)

    instrument = ExpireOnWake()
    async with serving(app, keep_alive_timeout=75) as (server, port):
        client = await Client.connect(port)
        await wait_all_tasks_blocked()
        (instrument.conn,) = server.sweep.waiting
        trio.lowlevel.add_instrument(instrument)
        try:
            await client.send(b"GET /late HTTP/1.1\r\nhost: t\r\n\r\n")
            assert await client.rest() == b""
        finally:
            trio.lowlevel.remove_instrument(instrument)
        assert instrument.conn is None  # it fired
    assert calls == []
