"""The direct channel's ticket, asked for and granted over a libp2p stream
(``/helexa/direct/1``): both ends of that stream were authenticated by noise, which also
keeps the grant's secret from anyone else (:mod:`.direct_tickets` has the wire).

Functions of a py-libp2p net stream (``read``/``write``/``close``/``reset``,
``muxed_conn.peer_id``, ``get_remote_address``), so that only :mod:`.libp2p_mesh` has to
know where the stream comes from.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from .base import DialFailed
from .direct_channel import DirectChannel
from .direct_tickets import GRANT_SIZE, TICKET_REQUEST

log = logging.getLogger(__name__)


async def _read_upto(net_stream: Any, size: int) -> bytes:
    data = b""
    while len(data) < size:
        try:
            chunk = await net_stream.read(size - len(data))
        except EOFError:
            break
        if not chunk:
            break
        data += chunk
    return data


async def _quietly(step: Any) -> None:
    with trio.move_on_after(1) as scope:
        scope.shield = True
        try:
            await step()
        except Exception:
            pass


async def grant_ticket(net_stream: Any, channel: DirectChannel, *, timeout: float) -> None:
    """Answer one ticket request with a ticket bound to the stream's (authenticated)
    peer. Never raises but for cancellation: an exception escaping a libp2p stream
    handler takes the host down."""
    try:
        with trio.fail_after(timeout):
            if await _read_upto(net_stream, len(TICKET_REQUEST)) != TICKET_REQUEST:
                raise ValueError("not a ticket request")
            await net_stream.write(channel.grant(net_stream.muxed_conn.peer_id.to_base58()))
            await net_stream.close()
    except Exception as exc:
        log.debug("mesh: a ticket request failed: %s", str(exc) or type(exc).__name__)
        await _quietly(net_stream.reset)


async def ask_ticket(net_stream: Any) -> tuple[str, bytes]:
    """Ask for a ticket on a new ``/helexa/direct/1`` stream and close it: the peer's IP
    address as this libp2p connection reaches it, and the grant's bytes (checked by the
    caller). The caller bounds the time.

    Raises:
        DialFailed: the connection has no IP address; anything the stream raises."""
    try:
        await net_stream.write(TICKET_REQUEST)
        grant = await _read_upto(net_stream, GRANT_SIZE)
        address = net_stream.get_remote_address()
        if not address:
            raise DialFailed("the libp2p connection has no IP address")
        return address[0], grant
    finally:
        await _quietly(net_stream.close)
