"""Receive-window credit on our request streams, returned the way go-yamux returns it.

A yamux receiver gives the sender credit (a WINDOW_UPDATE frame) as it reads. go-yamux
sends it only once half the receive window has been read since the last update, so a
request/response exchange of a few KiB carries no WINDOW_UPDATE at all. py-libp2p 0.8.1
sends one after almost every read that is not a whole half window: its "partial slack"
branch credits whatever was read, twice over, and runs before ``PY_YAMUX_RELEASE_ON_READ``
is even looked at (setting that to ``0`` only stops the reads in between). Each such
frame is an encryption, a syscall, and a wake-up of the peer's process to decrypt and
parse it, on both sides of every federated request (``docs/benchmarks.md``).

:func:`credit_at_half_window` gives one stream go-yamux's rule. The mesh applies it to the
streams it opens and accepts for helexa's protocols; libp2p's own streams (identify,
ping, gossipsub) keep the library's behaviour. The wire protocol is unchanged (when and
how much credit is sent is the receiver's choice), so any yamux peer interoperates.
Long transfers keep flowing: credit returns after each half window is consumed
(``tests/mesh/test_mesh_libp2p.py``).

It relies on YamuxStream's bookkeeping in py-libp2p 0.8.1 (``recv_window``,
``target_recv_window``, the connection's ``stream_buffers``, the ``_grow_*`` and
``_apply_autotune_epoch`` helpers); where a stream lacks any of it (another muxer, a
changed library), the stream is left as the library made it.
"""

from __future__ import annotations

from types import MethodType
from typing import Any

from libp2p.stream_muxer.yamux.yamux import YamuxStream

_NEEDS = ("conn", "stream_id", "recv_window", "target_recv_window", "_grow_threshold", "_grow_to_delta",
          "_apply_autotune_epoch", "send_window_update", "_auto_tune_and_send_window_update")


async def _credit_after_read(self: Any, *, bytes_read: int = 0) -> None:
    """Called by ``YamuxStream.read`` after each read (it replaces the library's
    ``_auto_tune_and_send_window_update`` on one stream): credit what was consumed once it
    reaches half the target window, with the library's window auto-tuning, else nothing.

    No await between reading and updating the counters, so no lock is needed (trio)."""
    buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
    consumed = self.target_recv_window - (self.recv_window + buffered)
    if consumed <= 0 or consumed < self._grow_threshold():
        return
    increment = self._grow_to_delta(buffered) + self._apply_autotune_epoch(buffered)
    if increment > 0:
        await self.send_window_update(increment, skip_lock=True)


def credit_at_half_window(muxed_stream: Any) -> bool:
    """Give ``muxed_stream`` (a libp2p net stream's ``muxed_stream``) go-yamux's credit
    rule. Returns whether it was applied (False: not a yamux stream we understand)."""
    if not isinstance(muxed_stream, YamuxStream) or not all(hasattr(muxed_stream, n) for n in _NEEDS):
        return False
    muxed_stream._auto_tune_and_send_window_update = MethodType(_credit_after_read, muxed_stream)  # type: ignore[method-assign]
    return True
