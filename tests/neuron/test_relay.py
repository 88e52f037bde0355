"""The neuron's relay of generation events: merged when they pile up, never reordered,
errors bare."""

from __future__ import annotations

import pytest
import trio

from helexa.protocol import GenerateResult, TokenChunk, Usage
from helexa.roles.neuron.relay import BATCH_TICKS, COLLECT_FLUSH_CHARS, collect, merge, relay

RID = "r1"


def tok(text: str, rid: str = RID, **kw) -> TokenChunk:  # type: ignore[no-untyped-def]
    return TokenChunk(rid, text, **kw)


def result() -> GenerateResult:
    return GenerateResult(RID, "stop", Usage(prompt_tokens=1, completion_tokens=3))


def test_merge_joins_runs_of_text_and_sums_tokens() -> None:
    assert merge([tok("a"), tok("b"), tok("c", tokens=2), result()]) == [tok("abc", tokens=4), result()]


def test_merge_keeps_the_first_chunk_s_prompt_count() -> None:
    """A stream's first chunk says how many tokens its prompt made (what a cut stream
    bills): joined with the chunks after it, the count stays."""
    assert merge([tok("a", prompt_tokens=42), tok("b"), tok("c")]) == [tok("abc", tokens=3, prompt_tokens=42)]


def test_merge_keeps_tool_call_chunks_and_other_requests_apart() -> None:
    call = tok("", tool_calls=({"id": "x"},))
    events = [tok("a"), call, tok("b"), tok("c", rid="r2"), tok("d")]
    assert merge(events) == events


async def _sent(events: list, *, gap: float = 0.0, send_delay: float = 0.0) -> list:  # type: ignore[type-arg]
    async def backend():  # type: ignore[no-untyped-def]
        for e in events:
            if gap:
                await trio.sleep(gap)
            else:
                await trio.lowlevel.checkpoint()
            yield e

    out: list = []  # type: ignore[type-arg]

    async def send(e) -> None:  # type: ignore[no-untyped-def]
        await trio.sleep(send_delay)
        out.append(e)

    await relay(backend(), send)
    return out


async def test_tokens_that_queue_up_behind_a_slow_send_go_as_one_frame(autojump_clock) -> None:  # noqa: ANN001
    events = [tok(f"t{i} ") for i in range(10)] + [result()]
    out = await _sent(events, gap=0.001, send_delay=0.1)
    assert out[0] == tok("t0 ")  # the first token is not held back
    # The first token is sent before the backend is read again, so the queue forms behind
    # the second: t0, t1, then the rest joined, then the result.
    assert len(out) <= 4
    assert "".join(e.text for e in out if isinstance(e, TokenChunk)) == "".join(f"t{i} " for i in range(10))
    assert sum(e.tokens for e in out if isinstance(e, TokenChunk)) == 10
    assert out[-1] == result()


async def test_tokens_a_backend_has_ready_tick_after_tick_join_one_frame_within_a_bound() -> None:
    # A backend producing one token per scheduler tick (the synthetic backend at full
    # speed): after the first frame, frames carry several tokens, at most ~BATCH_TICKS.
    events = [tok(f"t{i} ") for i in range(64)] + [result()]
    out = await _sent(events)
    chunks = [e for e in out if isinstance(e, TokenChunk)]
    assert chunks[0].tokens <= 2  # the first frame goes out at once, with what is there
    assert len(chunks) < 64 // 2
    assert max(c.tokens for c in chunks) <= BATCH_TICKS + 4  # + what came during the send
    assert "".join(c.text for c in chunks) == "".join(f"t{i} " for i in range(64))
    assert out[-1] == result()


async def test_a_backend_slower_than_the_link_is_relayed_token_by_token(autojump_clock) -> None:  # noqa: ANN001
    events = [tok(f"t{i} ") for i in range(5)] + [result()]
    assert await _sent(events, gap=0.05, send_delay=0.001) == events


async def test_the_first_event_is_sent_before_the_backend_is_read_again_and_slow_ones_without_idle_ticks(
        autojump_clock, monkeypatch) -> None:  # noqa: ANN001
    log: list = []  # type: ignore[type-arg]

    async def backend():  # type: ignore[no-untyped-def]
        for i in range(3):
            log.append(("read", i))
            yield tok(f"t{i}")
            await trio.sleep(0.02)  # a real model's pace
        log.append(("read", "end"))
        yield result()

    async def send(e) -> None:  # type: ignore[no-untyped-def]
        log.append(("sent", e.text if isinstance(e, TokenChunk) else "result"))

    import helexa.roles.neuron.relay as relay_module

    async def no_idle_ticks(*args) -> None:  # type: ignore[no-untyped-def]
        raise AssertionError("waited for more of a backend this slow")

    monkeypatch.setattr(relay_module, "_while_producing", no_idle_ticks)
    await relay(backend(), send)
    assert log[:2] == [("read", 0), ("sent", "t0")]
    assert [e for e in log if e[0] == "sent"] == [("sent", "t0"), ("sent", "t1"), ("sent", "t2"), ("sent", "result")]


async def test_slow_tokens_go_out_from_the_task_that_read_them_until_a_send_has_to_wait(autojump_clock) -> None:  # noqa: ANN001
    readers: list = []  # type: ignore[type-arg]  # the task that read each event
    senders: list = []  # type: ignore[type-arg]

    async def backend():  # type: ignore[no-untyped-def]
        for i in range(4):
            readers.append(trio.lowlevel.current_task())
            yield tok(f"t{i}")
            await trio.sleep(0.02)  # a real model's pace
        readers.append(trio.lowlevel.current_task())
        yield result()

    async def send(e) -> None:  # type: ignore[no-untyped-def]
        senders.append(trio.lowlevel.current_task())
        if isinstance(e, TokenChunk) and e.text == "t1":
            await trio.sleep(0.01)  # the link makes this send wait

    caller = trio.lowlevel.current_task()
    await relay(backend(), send)
    by_reader = [sender is reader for sender, reader in zip(senders, readers, strict=True)]
    # t0: read and sent by the caller's own task; t1 by the producer that read it; t2, after
    # a send that waited, through the sender, whose send did not wait; so t3 and the result
    # from the producer again.
    assert by_reader == [True, True, False, True, True]
    assert readers[0] is caller and all(r is readers[1] for r in readers[1:]) and readers[1] is not caller


async def test_the_first_event_is_read_and_sent_by_the_callers_task_with_no_other_task_started(
        autojump_clock) -> None:  # noqa: ANN001
    # The request reaches its backend (a worker's pipe, a proxied server) with no task start
    # and no scheduler pass before it.
    seen: list = []  # type: ignore[type-arg]

    async def backend():  # type: ignore[no-untyped-def]
        seen.append(("read", trio.lowlevel.current_task(), trio.lowlevel.current_statistics().tasks_living))
        yield tok("a")
        await trio.sleep(0.02)
        yield result()

    async def send(e) -> None:  # type: ignore[no-untyped-def]
        seen.append(("send", trio.lowlevel.current_task(), trio.lowlevel.current_statistics().tasks_living))

    caller = trio.lowlevel.current_task()
    living = trio.lowlevel.current_statistics().tasks_living
    await relay(backend(), send)
    assert seen[0] == ("read", caller, living) and seen[1] == ("send", caller, living)


async def test_a_backend_error_comes_bare_after_what_it_produced_before() -> None:
    sent: list = []  # type: ignore[type-arg]
    calls: list = []  # type: ignore[type-arg]

    async def backend():  # type: ignore[no-untyped-def]
        yield tok("a")
        raise ValueError("backend broke")

    async def send(e) -> None:  # type: ignore[no-untyped-def]
        sent.append(e)

    with pytest.raises(ValueError, match="backend broke"):
        await relay(backend(), send, on_first=lambda: calls.append(1))
    assert sent == [tok("a")] and calls == [1]


async def test_a_send_error_comes_bare_and_stops_the_backend() -> None:
    produced: list = []  # type: ignore[type-arg]

    async def backend():  # type: ignore[no-untyped-def]
        for i in range(1000):
            produced.append(i)
            yield tok(str(i))
            await trio.sleep(0)

    async def send(e) -> None:  # type: ignore[no-untyped-def]
        raise ConnectionError("link gone")

    with pytest.raises(ConnectionError):
        await relay(backend(), send)
    assert len(produced) < 10


async def test_an_empty_generation_sends_nothing_and_never_calls_on_first() -> None:
    async def backend():  # type: ignore[no-untyped-def]
        return
        yield

    calls: list = []  # type: ignore[type-arg]

    async def send(e) -> None:  # type: ignore[no-untyped-def]
        raise AssertionError("nothing to send")

    await relay(backend(), send, on_first=lambda: calls.append(1))
    assert calls == []


async def _collected(events: list, **kw) -> list:  # type: ignore[type-arg]
    async def backend():  # type: ignore[no-untyped-def]
        for e in events:
            yield e

    out: list = []  # type: ignore[type-arg]

    async def send(e) -> None:  # type: ignore[no-untyped-def]
        out.append(e)

    await collect(backend(), send, **kw)
    return out


async def test_collect_sends_a_generation_as_one_result_with_all_the_text() -> None:
    events = [tok("a"), tok("", tool_calls=({"id": "x"},)), tok("b"), GenerateResult(RID, "stop", Usage(1, 3), text="c")]
    (got,) = await _collected(events)
    assert got == GenerateResult(RID, "stop", Usage(1, 3), "abc", ({"id": "x"},), first_token_s=got.first_token_s)
    assert got.first_token_s is not None and got.first_token_s >= 0


async def test_a_collected_result_says_when_its_first_text_came(autojump_clock) -> None:
    # What an answer in one object cannot show by its first chunk (Ollama's durations).
    async def backend():  # type: ignore[no-untyped-def]
        await trio.sleep(2.5)  # the prompt
        yield tok("a")
        await trio.sleep(4.0)
        yield GenerateResult(RID, "stop", Usage(1, 2), text="b")

    out: list = []  # type: ignore[type-arg]

    async def send(e) -> None:  # type: ignore[no-untyped-def]
        out.append(e)

    await collect(backend(), send)
    assert out[0].text == "ab" and out[0].first_token_s == 2.5
    assert (await _collected([result()]))[0].first_token_s is None  # no text before the result


async def test_collect_sends_a_very_long_answer_in_pieces_no_frame_near_the_limit() -> None:
    piece = "x" * 1000
    started: list[bool] = []
    events = [tok(piece) for _ in range(COLLECT_FLUSH_CHARS // 1000 * 2 + 10)] + [result()]
    out = await _collected(events, on_first=lambda: started.append(True))
    assert started and all(isinstance(e, TokenChunk) for e in out[:-1]) and isinstance(out[-1], GenerateResult)
    assert len(out) == 3 and all(len(e.text) <= COLLECT_FLUSH_CHARS + 1000 for e in out)
    assert "".join(e.text for e in out) == piece * (len(events) - 1)


async def test_collect_raises_what_the_backend_raises() -> None:
    async def backend():  # type: ignore[no-untyped-def]
        yield tok("a")
        raise RuntimeError("boom")

    async def send(e) -> None:  # type: ignore[no-untyped-def]
        raise AssertionError("nothing is sent before the failure")

    with pytest.raises(RuntimeError, match="boom"):
        await collect(backend(), send)
