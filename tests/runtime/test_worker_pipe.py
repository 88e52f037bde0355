"""A worker's frames on their way to the neuron, without a worker process: text chunks
joined by the worker's writer (:func:`helexa.runtime.worker.child.coalesce`), and the pipe
written from threads (helexa/runtime/worker/pipe.py) over a socket pair."""

from __future__ import annotations

import pytest
import trio

from helexa.protocol import GenerateResult, InferenceError, TokenChunk, Usage
from helexa.protocol.worker import frame
from helexa.runtime.worker.child import coalesce


# --- the worker's writer ----------------------------------------------------------------------


def test_text_chunks_of_each_request_are_joined_and_every_request_keeps_its_order():
    a1, b1, a2 = TokenChunk("a", "x"), TokenChunk("b", "y"), TokenChunk("a", "z")
    tool = TokenChunk("a", "", 1, tool_calls=({"id": "t"},))
    end_b = GenerateResult("b", "stop", Usage())
    err_a = InferenceError("a", "cancelled", "cancelled")
    out = coalesce([a1, b1, a2, end_b, tool, TokenChunk("a", "w"), TokenChunk("b", "late"), err_a])
    assert out == [TokenChunk("a", "xz", 2), TokenChunk("b", "y"), end_b, tool, TokenChunk("a", "w"),
                   TokenChunk("b", "late"), err_a]


def test_joined_text_keeps_the_first_chunk_s_prompt_count():
    out = coalesce([TokenChunk("a", "x", prompt_tokens=42), TokenChunk("a", "y"), TokenChunk("a", "z")])
    assert out == [TokenChunk("a", "xyz", 3, prompt_tokens=42)]


def test_joined_text_stops_growing_at_its_limit():
    from helexa.runtime.worker.child import MAX_JOINED_CHARS

    piece = "x" * (MAX_JOINED_CHARS // 2 + 1)
    out = coalesce([TokenChunk("a", piece)] * 3)
    assert [len(c.text) for c in out] == [2 * len(piece), len(piece)]


# --- the pipe, written from threads (helexa/runtime/worker/pipe.py) ------------------------


async def test_frames_posted_from_threads_and_the_trio_thread_arrive_whole_and_in_each_ones_order(nursery):
    """Three threads and the trio thread post at once while the reader does not read, so
    most frames are kept for the writer task; every frame still arrives whole, and each
    sender's frames in the order it posted them."""
    import socket
    import threading

    from helexa.runtime.worker.pipe import Pipe

    a, b = socket.socketpair()
    writer, reader = Pipe(a), Pipe(b)
    nursery.start_soon(writer.run)
    n, text = 300, "x" * 3000  # ~3.6 MB in all: far past the socket's buffer

    def post_many(name: str) -> None:
        for i in range(n):
            writer.post_from_thread(frame(TokenChunk(name, f"{i}:{text}")))

    threads = [threading.Thread(target=post_many, args=(f"t{k}",)) for k in range(3)]
    for t in threads:
        t.start()
    for i in range(n):
        writer.send(TokenChunk("trio", f"{i}:{text}"))
    await trio.to_thread.run_sync(lambda: [t.join() for t in threads])
    seen: dict[str, list[int]] = {}
    with trio.fail_after(30):
        while sum(map(len, seen.values())) < 4 * n:
            for msg in await reader.receive_batch():
                seen.setdefault(msg.request_id, []).append(int(msg.text.split(":")[0]))
    assert seen == {name: list(range(n)) for name in ("t0", "t1", "t2", "trio")}
    await writer.wait_flushed()
    assert writer.flushed
    await writer.aclose()
    await reader.aclose()


async def test_a_thread_posting_to_a_pipe_whose_peer_is_gone_is_told_so(nursery):
    import socket

    from helexa.runtime.worker.pipe import Pipe
    from helexa.transport import ChannelClosed

    a, b = socket.socketpair()
    writer = Pipe(a)
    nursery.start_soon(writer.run)
    b.close()

    def post() -> None:
        for _ in range(3):
            writer.post_from_thread(frame(TokenChunk("r", "x")))

    with pytest.raises(ChannelClosed):
        await trio.to_thread.run_sync(post)
    with trio.fail_after(5):
        await writer.wait_flushed()  # a broken pipe counts as flushed: nobody waits forever
    await writer.aclose()
