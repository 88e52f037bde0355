"""The libp2p implementation of :class:`helexa.mesh.base.Mesh` (py-libp2p 0.8.1).

Every sharp edge listed in ``shared/notes/stack.md`` is handled here, and only here:

* the Pubsub and GossipSub services are entered before ``host.run`` (peers dialling in
  early crash a pubsub that is not yet running);
* GossipSub is tuned explicitly (1 s heartbeat, raised per-topic rate limit);
* every stream handler catches everything and resets its stream (an escaping exception
  tears the host down);
* a reconnect supervisor redials bootstrap and known peers and clears the swarm's
  negative dial cache first, so a restarted peer is back in seconds, not a minute;
* identify (on by default in the host) teaches us peers' listen addresses; mDNS is off;
* the kad-dht "Failed to read DHT message" log line is filtered;
* every connected peer is pinged each ``liveness_interval``; one silent for
  ``liveness_timeout`` (a frozen process keeps its TCP connection open, so nothing else
  notices) has its connection closed, which fails its streams at once (:mod:`.liveness`);
* a neighbour may forward only so many new gossip messages per second
  (:mod:`.gossip_limit`); the rest are rejected as invalid, which GossipSub's peer score
  counts (:data:`GOSSIP_SCORE`): a flooding neighbour is soon ignored, then forgiven as
  its score decays;
* yamux returns receive window credit on our request streams the way go-yamux does (once
  half the window is read) instead of py-libp2p's WINDOW_UPDATE frame after almost every
  read, which doubled the frames of a request/response exchange (:mod:`.yamux_credit`;
  :data:`_YAMUX_TUNING` does part of it for libp2p's own streams);
* our request streams go over the direct channel where the peer has one
  (:mod:`.direct_channel`: a TCP connection sealed with keys granted over the libp2p
  connection, without yamux and noise in Python), over libp2p otherwise.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Sequence
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.score import ScoreParams, TopicScoreParams
from libp2p.tools.anyio_service import background_trio_service

from .gossip_limit import GossipLimiter
from .liveness import Liveness
from .direct_channel import DIRECT_PROTOCOL, DirectChannel
from .base import (
    DialFailed,
    GossipMessage,
    Mesh,
    MessageStream,
    StreamClosed,
    StreamHandler,
    TopicValidator,
    protocol_choices,
)
from .settings import MeshSettings
from .streams import FramedStream, run_handler
from .ticket_exchange import ask_ticket, grant_ticket
from .yamux_credit import credit_at_half_window

log = logging.getLogger(__name__)

_READ_CHUNK = 64 * 1024

_YAMUX_TUNING = {"PY_YAMUX_RELEASE_ON_READ": "0"}
"""py-libp2p's yamux reads its tuning from the environment at each call. With
``RELEASE_ON_READ`` on (its default) a read that finds the window over-credited sends a
WINDOW_UPDATE frame back anyway. Off, fewer of them go out on libp2p's own streams
(identify, ping, gossipsub); our request streams go further (:mod:`.yamux_credit`: none
until half the window is read). An operator's own setting of the variable wins."""
for _name, _value in _YAMUX_TUNING.items():
    os.environ.setdefault(_name, _value)


class _DhtNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Failed to read DHT message" not in record.getMessage()


logging.getLogger("libp2p.kad_dht.kad_dht").addFilter(_DhtNoise())


class _Repeats(logging.Filter):
    """A message said again within ``every`` seconds is dropped: the reconnect supervisor
    redials a peer each second or three (a bootstrap peer forever), and each failed dial of
    one whose key changed (its data directory wiped) logged the same ERROR every time."""

    def __init__(self, every: float = 600.0, kept: int = 1024) -> None:
        super().__init__()
        self._every, self._kept = every, kept
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        text, now = record.getMessage(), record.created
        last = self._last.get(text)
        if last is not None and now - last < self._every:
            return False
        if len(self._last) >= self._kept:
            self._last.clear()
        self._last[text] = now
        return True


# py-libp2p's own setup (LIBP2P_DEBUG unset) leaves its "libp2p" logger with no handler and
# not propagating, so its warnings and errors went to Python's last-resort handler: bare
# lines on stderr outside the operator's format (a line that is not JSON under --log-format
# json). Through the root handler they carry the time, level and name, in either format.
# Its INFO lines stay out, as before: some of its modules set their own logger to INFO
# (the auto-connector's state, every 10 s).
if not logging.getLogger("libp2p").handlers:
    logging.getLogger("libp2p").propagate = True
    for _logger_name in [n for n in logging.root.manager.loggerDict if n.startswith("libp2p.")]:
        _logger = logging.getLogger(_logger_name)
        if logging.NOTSET < _logger.level < logging.WARNING:
            _logger.setLevel(logging.WARNING)
logging.getLogger("libp2p.network.swarm").addFilter(_Repeats())


class _Libp2pStream(FramedStream):
    def __init__(self, net_stream: Any, remote_peer: str, *, timeout: float, max_frame: int) -> None:
        super().__init__(remote_peer, timeout=timeout, max_frame=max_frame)
        self._ns = net_stream
        credit_at_half_window(getattr(net_stream, "muxed_stream", None))

    async def _write_raw(self, data: bytes) -> None:
        try:
            await self._ns.write(data)
        except Exception as exc:
            raise StreamClosed(f"stream to {self.remote_peer} broke: {type(exc).__name__}") from None

    async def _read_raw(self) -> bytes:
        try:
            return await self._ns.read(_READ_CHUNK)
        except EOFError:
            return b""
        except Exception as exc:
            raise StreamClosed(f"stream from {self.remote_peer} broke: {type(exc).__name__}") from None

    async def _close_raw(self) -> None:
        await self._ns.close()

    async def _reset_raw(self) -> None:
        await self._ns.reset()


GOSSIP_SCORE = ScoreParams(
    # Each rejected message (over the rate limit, or refused by a topic's validator) costs
    # its forwarder 1 point, decaying by 10% per heartbeat (1 s): 100 in a few seconds
    # puts it under the thresholds, and it is heard again some 25 s after it stops.
    p4_invalid_messages=TopicScoreParams(weight=1.0, cap=10_000.0, decay=0.9),
    publish_threshold=-100.0,
    gossip_threshold=-100.0,
    graylist_threshold=-100.0,
)


class Libp2pMesh(Mesh):
    """A libp2p host with GossipSub and our request streams.

    Args:
        seed: the cortex identity's 32-byte Ed25519 seed (``Identity.seed``); the peer id
            derives from it, so it is stable across restarts.
        settings: listen address, bootstrap peers, timeouts, gossip tuning.
    """

    def __init__(self, seed: bytes, settings: MeshSettings = MeshSettings()) -> None:
        self._settings = settings
        self._key_pair = create_new_key_pair(seed)
        self._id = ID.from_pubkey(self._key_pair.public_key)
        self._handlers: dict[str, StreamHandler] = {}
        self._host: Any = None
        self._pubsub: Any = None
        self._known: dict[ID, list[multiaddr.Multiaddr]] = {}
        self._bootstrap_ids: set[ID] = set()
        self._lost_since: dict[ID, float] = {}
        self._next_dial: dict[ID, float] = {}
        self._dialing: set[ID] = set()
        self._subscribed: set[str] = set()
        self.gossip_limit = GossipLimiter(settings.gossip_per_peer_per_second, settings.gossip_per_peer_burst)
        self.direct: DirectChannel | None = DirectChannel(settings, self._handlers) if settings.direct else None
        """The direct channel (``None`` when ``settings.direct`` is off); its ``stats``
        count the streams it carried."""
        self.liveness = Liveness(self._id, settings, self.direct)
        """Pings of the connected peers; its counters say what was pinged and closed."""
        for addr in settings.bootstrap:
            info = _parse_p2p(addr)
            self._known[info.peer_id] = list(info.addrs)
            self._bootstrap_ids.add(info.peer_id)

    @property
    def peer_id(self) -> str:
        return self._id.to_base58()

    @property
    def listen_addrs(self) -> list[str]:
        if self._host is None:
            return []
        return [f"{a}/p2p/{self.peer_id}" for a in self._host.get_transport_addrs()]

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        s = self._settings
        listen = multiaddr.Multiaddr(s.listen)
        host = new_host(key_pair=self._key_pair, listen_addrs=[listen], enable_mDNS=s.mdns)
        gossipsub = GossipSub(
            protocols=[PROTOCOL_ID_V11, PROTOCOL_ID],
            degree=s.gossip_degree,
            degree_low=s.gossip_degree_low,
            degree_high=s.gossip_degree_high,
            heartbeat_initial_delay=0.1,
            heartbeat_interval=s.gossip_heartbeat,  # type: ignore[arg-type]  # a float works
            max_messages_per_topic_per_second=s.gossip_max_per_topic_per_second,
            # Loopback tests and small meshes live on one IP: do not starve them.
            eclipse_protection_enabled=False,
            score_params=GOSSIP_SCORE,
        )
        pubsub = Pubsub(host, gossipsub, strict_signing=True)
        async with background_trio_service(pubsub), background_trio_service(gossipsub):
            async with host.run(listen_addrs=[listen]):
                self._host = host
                self._pubsub = pubsub
                try:
                    for protocol, handler in self._handlers.items():
                        self._install(protocol, handler)
                    with trio.fail_after(s.dial_timeout):
                        await pubsub.wait_until_ready()
                    async with trio.open_nursery() as nursery:
                        if self.direct is not None:
                            await self._start_direct(nursery, listen)
                        nursery.start_soon(self._supervise, nursery)
                        nursery.start_soon(self.liveness.watch, host, nursery)
                        log.info("mesh up as %s on %s", self.peer_id, ", ".join(self.listen_addrs))
                        task_status.started(self.listen_addrs)
                        await trio.sleep_forever()
                finally:
                    self._host = None
                    self._pubsub = None

    async def _start_direct(self, nursery: trio.Nursery, listen: multiaddr.Multiaddr) -> None:
        """Listen for direct connections on the libp2p listener's address and grant
        tickets over ``/helexa/direct/1``; without a listener, only dial others'."""
        assert self.direct is not None
        host_ip = None
        for proto in ("ip4", "ip6"):
            try:
                host_ip = listen.value_for_protocol(proto)
                break
            except Exception:
                continue
        if not host_ip:
            log.warning("mesh: no direct channel on %s (not an IP address); peers reach us over libp2p", listen)
            return
        try:
            port = await nursery.start(self.direct.run, host_ip)
        except OSError as exc:
            log.warning("mesh: the direct channel could not listen on %s port %d (%s); peers reach us over "
                        "libp2p", host_ip, self._settings.direct_port, exc)
            return
        self._host.set_stream_handler(TProtocol(DIRECT_PROTOCOL), self._grant_ticket)
        log.info("mesh: direct channel on %s port %d", host_ip, port)

    async def _grant_ticket(self, net_stream: Any) -> None:
        assert self.direct is not None
        await grant_ticket(net_stream, self.direct, timeout=self._settings.direct_timeout)

    async def _ask_ticket(self, peer_id: str) -> tuple[str, bytes]:
        return await ask_ticket(await self._require_host().new_stream(_parse_id(peer_id), [TProtocol(DIRECT_PROTOCOL)]))

    # --- gossip ---------------------------------------------------------------------------

    async def announce(self, topic: str, data: bytes) -> None:
        if self._pubsub is None:
            raise RuntimeError("the mesh is not running")
        await self._pubsub.publish(topic, data)

    async def subscribe(self, topic: str, validator: TopicValidator | None = None) -> AsyncIterator[GossipMessage]:
        pubsub = self._pubsub
        if pubsub is None:
            raise RuntimeError("the mesh is not running")
        if topic in self._subscribed:
            raise RuntimeError(f"already subscribed to {topic!r}")
        self._subscribed.add(topic)
        check = validator
        limit, me_id = self.gossip_limit, self._id

        def validate(forwarder: ID, msg: Any) -> bool:
            if forwarder != me_id and not limit.allow(forwarder.to_base58(), trio.current_time()):
                return False
            if check is None:
                return True
            try:
                return bool(check(ID(msg.from_id).to_base58(), msg.data))
            except Exception:
                return False

        pubsub.set_topic_validator(topic, validate, False)
        sub = await pubsub.subscribe(topic)
        me = self._id.to_bytes()
        try:
            while True:
                msg = await sub.get()
                if msg.from_id == me:
                    continue
                yield GossipMessage(ID(msg.from_id).to_base58(), bytes(msg.data))
        finally:
            self._subscribed.discard(topic)
            with trio.move_on_after(1) as scope:
                scope.shield = True
                try:
                    await pubsub.unsubscribe(topic)
                    pubsub.remove_topic_validator(topic)
                except Exception:
                    log.debug("unsubscribe from %s failed", topic, exc_info=True)

    # --- streams --------------------------------------------------------------------------

    def serve(self, protocol: str, handler: StreamHandler) -> None:
        self._handlers[protocol] = handler
        if self._host is not None:
            self._install(protocol, handler)

    def _install(self, protocol: str, handler: StreamHandler) -> None:
        settings = self._settings

        async def on_stream(net_stream: Any) -> None:
            try:
                remote = net_stream.muxed_conn.peer_id.to_base58()
                stream = _Libp2pStream(net_stream, remote, timeout=settings.stream_timeout,
                                       max_frame=settings.max_frame)
            except Exception:
                log.exception("could not accept a %s stream", protocol)
                try:
                    await net_stream.reset()
                except Exception:
                    pass
                return
            await run_handler(handler, stream, protocol)

        self._host.set_stream_handler(TProtocol(protocol), on_stream)

    async def open_stream(self, peer_id: str, protocol: str | Sequence[str], *,
                          timeout: float | None = None) -> MessageStream:
        host = self._require_host()
        pid = _parse_id(peer_id)
        choices = protocol_choices(protocol)
        wanted = " or ".join(choices)
        host.get_network().unblock_peer(pid)
        deadline = trio.current_time() + (self._settings.dial_timeout if timeout is None else timeout)
        try:
            with trio.fail_at(deadline):
                if pid not in host.get_network().connections and pid in self._known:
                    await host.connect(PeerInfo(pid, self._known[pid]))
            if self.direct is not None and pid in host.get_network().connections:
                stream = await self.direct.open(peer_id, choices, self._ask_ticket, deadline=deadline)
                if stream is not None:
                    return stream
            with trio.fail_at(deadline):  # multistream-select takes the first the peer serves
                net_stream = await host.new_stream(pid, [TProtocol(p) for p in choices])
        except trio.TooSlowError:
            raise DialFailed(f"opening {wanted} to {peer_id} timed out") from None
        except DialFailed:
            raise
        except Exception as exc:
            raise DialFailed(f"cannot open {wanted} to {peer_id}: {exc or type(exc).__name__}") from None
        stream = _Libp2pStream(net_stream, peer_id, timeout=self._settings.stream_timeout,
                               max_frame=self._settings.max_frame)
        stream.protocol = str(net_stream.get_protocol() or choices[0])
        return stream

    # --- peers ----------------------------------------------------------------------------

    def peers(self) -> list[str]:
        if self._host is None:
            return []
        return [p.to_base58() for p in self._host.get_connected_peers()]

    def gossip_score(self, peer: str, topic: str) -> float:
        """``peer``'s GossipSub score on ``topic`` as this node keeps it (0 when unknown)."""
        router = getattr(self._pubsub, "router", None)
        scorer = getattr(router, "scorer", None)
        if scorer is None:
            return 0.0
        return float(scorer.topic_score(ID.from_base58(peer), topic))

    async def connect(self, multiaddr_: str, *, timeout: float | None = None) -> str:
        host = self._require_host()
        try:
            info = _parse_p2p(multiaddr_)
        except ValueError as exc:
            raise DialFailed(str(exc)) from None
        self._known[info.peer_id] = list(info.addrs)
        host.get_network().unblock_peer(info.peer_id)
        try:
            with trio.fail_after(self._settings.dial_timeout if timeout is None else timeout):
                await host.connect(info)
        except trio.TooSlowError:
            raise DialFailed(f"dialling {multiaddr_} timed out") from None
        except Exception as exc:
            raise DialFailed(f"cannot dial {multiaddr_}: {exc or type(exc).__name__}") from None
        return info.peer_id.to_base58()

    def add_addrs(self, peer_id: str, addrs: list[str]) -> None:
        try:
            pid = _parse_id(peer_id)
            parsed = [multiaddr.Multiaddr(a.split("/p2p/")[0]) for a in addrs]
        except Exception:
            return
        if pid != self._id and parsed:
            self._known[pid] = parsed

    def _require_host(self) -> Any:
        if self._host is None:
            raise DialFailed("the mesh is not running")
        return self._host

    async def _supervise(self, nursery: trio.Nursery) -> None:
        """Keep every known peer connected: redial lost ones with a short back-off."""
        s = self._settings
        while True:
            host = self._host
            now = trio.current_time()
            connected = set(host.get_connected_peers())
            store = host.get_peerstore()
            for pid in connected:
                self._lost_since.pop(pid, None)
                self._next_dial.pop(pid, None)
                try:
                    addrs = [a for a in store.addrs(pid) if a.value_for_protocol("tcp")]
                except Exception:
                    addrs = []
                if addrs:
                    self._known[pid] = addrs
            for pid in list(self._known):
                if pid in connected or pid in self._dialing or pid == self._id:
                    continue
                since = self._lost_since.setdefault(pid, now)
                if pid not in self._bootstrap_ids and now - since > s.forget_after:
                    del self._known[pid]
                    del self._lost_since[pid]  # a forgotten peer's entries went with it: the tables stay bounded
                    self._next_dial.pop(pid, None)
                    continue
                if now >= self._next_dial.get(pid, 0.0):
                    self._dialing.add(pid)
                    nursery.start_soon(self._redial, pid)
            await trio.sleep(s.reconnect_interval)

    async def _redial(self, pid: ID) -> None:
        s = self._settings
        try:
            host = self._host
            host.get_network().unblock_peer(pid)
            with trio.move_on_after(s.dial_timeout):
                await host.connect(PeerInfo(pid, self._known.get(pid, [])))
                log.info("mesh: connected to %s", pid.to_base58())
                return
        except Exception as exc:
            log.debug("mesh: redial of %s failed: %s", pid, exc)
        finally:
            self._dialing.discard(pid)
        if pid not in self._known:  # forgotten while this dial ran
            return
        since = self._lost_since.get(pid, trio.current_time())
        backoff = min(s.max_redial_interval, max(s.reconnect_interval, (trio.current_time() - since) / 4))
        self._next_dial[pid] = trio.current_time() + backoff


def _parse_id(peer_id: str) -> ID:
    try:
        return ID.from_base58(peer_id)
    except Exception:
        raise DialFailed(f"{peer_id!r} is not a peer id") from None


def _parse_p2p(addr: str) -> PeerInfo:
    """``/ip4/.../tcp/.../p2p/<id>`` to a PeerInfo.

    Raises:
        ValueError: not a multiaddr, or no ``/p2p/`` part.
    """
    try:
        return info_from_p2p_addr(multiaddr.Multiaddr(addr))
    except Exception as exc:
        raise ValueError(f"{addr!r} is not a multiaddr ending in /p2p/<peer id>: {exc}") from None
