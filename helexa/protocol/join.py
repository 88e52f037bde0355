"""The join handshake as two sans-IO state machines: :class:`NeuronJoin` and :class:`CortexJoin`.

Each side is fed the peer's messages with ``receive(msg)``, which returns the messages to
send, in order, and may settle the session's ``verdict``. Nothing here reads a socket or
a clock: the I/O shell moves frames, applies the one handshake deadline
(``session.timeout``) and calls ``expire()`` when it passes.

The transitions (``CortexJoin._TABLE`` and ``NeuronJoin._TABLE`` map each waiting state
and the message it expects to the step that handles it)::

    cortex       AWAIT_HELLO      Hello      -> Challenge    AWAIT_JOIN
                                             -> Refused      REFUSED   (bad nonce, replayed
                                                                        nonce, no common version)
                 AWAIT_JOIN       Join       -> Welcome      JOINED
                                             -> Refused      REFUSED   (other node id, token
                                                                        unreadable, wrong proof,
                                                                        bad key signature, node
                                                                        id bound to another key,
                                                                        strict: id not enrolled)
    neuron       START            start()    -> Hello        AWAIT_CHALLENGE
                 AWAIT_CHALLENGE  Challenge  -> Join         AWAIT_WELCOME
                                             -> ()           REFUSED   (version not ours)
                                                             IMPOSTOR  (our nonce reflected)
                                  Refused    -> ()           REFUSED
                 AWAIT_WELCOME    Welcome    -> ()           JOINED
                                                             IMPOSTOR  (bad counter-proof)
                                  Refused    -> ()           REFUSED
    both         AWAIT_*          Fault      -> ()           FAILED
                                  other      -> Fault        FAILED
                                  expire()   -> ()           FAILED    (peer silent)

From version 2 (:data:`IDENTITY_VERSION`) the neuron's join also carries its Ed25519
identity key and a signature over both nonces and its node id
(:func:`~helexa.protocol.auth.identity_statement`). The cortex looks up the key its node id
is bound to (``bound``; the binding itself, trust on first use, is the shell's:
:mod:`helexa.roles.cortex.neuron_keys`) and refuses a join whose key differs, or that
carries none, with :data:`~.join_identity.IDENTITY_MISMATCH`: the join token makes a neuron
belong, its key makes it the neuron it says it is. A node id bound to no key admits any key
(the shell then binds it), and a neuron of version 1, with none; unless the cortex enrols
``strict``ly, when a node id bound to no key is refused with
:data:`~.join_identity.NOT_ENROLLED` (the operator binds it beforehand: ``helexa neurons
enrol``). Those rules are :func:`~.join_identity.identity_refusal`. From version 3
(:data:`CACHE_REPORT_VERSION`) the join also says what the neuron's model cache holds
(:attr:`~.messages.Join.cached`).

Verdicts: the cortex admits a neuron (:class:`Admitted`), the neuron is welcomed
(:class:`Welcomed`), either side ends in a :class:`Refusal` (retrying cannot help), the
neuron finds an :class:`Impostor` (the cortex does not hold its token), or the peer broke
the protocol or went silent (:class:`Failure`; a new connection may succeed). The proofs
themselves are :mod:`helexa.protocol.auth`.

Calling ``receive`` after a verdict is a bug in the caller and raises ``RuntimeError``.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from helexa.identity import Identity

from . import auth, join_screen
from .codec import MIN_PROTOCOL_VERSION
from .hardware import NeuronDescriptor
from .join_identity import identity_refusal, node_id_problem
from .messages import MAX_CACHE_REPORT, Challenge, Fault, Hello, Join, Refused, Welcome
from .model import ModelConfig, ModelStatus
from .takeover import CLOSE_REPLACED  # noqa: F401  (re-exported)

IDENTITY_VERSION = 2
"""The first handshake version whose :class:`Join` carries the neuron's identity key."""

CACHE_REPORT_VERSION = 3
"""The first handshake version whose :class:`Join` and heartbeats report the neuron's model cache."""

JOIN_VERSIONS = (MIN_PROTOCOL_VERSION, CACHE_REPORT_VERSION)
"""The handshake versions this build speaks, oldest and newest (what a hello offers and a
challenge picks from). Frames keep the codec's ``PROTOCOL_VERSION`` stamp: a later version's
frames only grow by fields an older build never receives (:func:`~.codec.added_field`)."""

class State(enum.Enum):
    START = "start"
    AWAIT_HELLO = "await_hello"
    AWAIT_CHALLENGE = "await_challenge"
    AWAIT_JOIN = "await_join"
    AWAIT_WELCOME = "await_welcome"
    JOINED = "joined"
    REFUSED = "refused"
    IMPOSTOR = "impostor"
    FAILED = "failed"


# --- verdicts ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Admitted:
    """The cortex's verdict: the neuron proved the join token."""

    node_id: str
    version: int
    session_id: str
    descriptor: NeuronDescriptor
    models: tuple[ModelStatus, ...]
    configs: tuple[ModelConfig, ...]
    public_key: bytes = b""
    """The neuron's identity key, its signature verified (empty: a version-1 neuron sent none)."""
    cached: tuple[str, ...] = ()
    """The cache keys of the sources its model cache holds (empty from a neuron before version 3)."""


@dataclass(frozen=True, slots=True)
class Welcomed:
    """The neuron's verdict: it joined the cortex that holds its token."""

    version: int
    session_id: str
    heartbeat_interval: float
    operator: str
    cortex_id: str


@dataclass(frozen=True, slots=True)
class Refusal:
    """The join cannot succeed and a retry cannot help (wrong token, no common version...).

    On the cortex, the ``Refused`` frame carrying it is among the messages to send.
    """

    code: str
    reason: str


@dataclass(frozen=True, slots=True)
class Impostor:
    """The neuron's verdict: the peer is not the cortex holding its token."""

    reason: str


@dataclass(frozen=True, slots=True)
class Failure:
    """The peer broke the protocol (``code`` ``"unexpected"``, or the code of the peer's
    ``Fault``) or went silent (``"timeout"``); a new connection may succeed."""

    code: str
    reason: str


Verdict = Admitted | Welcomed | Refusal | Impostor | Failure


# --- shared ------------------------------------------------------------------------------


def choose_version(ours: tuple[int, int], theirs: tuple[int, int]) -> int | None:
    """The highest protocol version both ranges hold, or None."""
    version = min(ours[1], theirs[1])
    return version if version >= max(ours[0], theirs[0]) else None


class RecentNonces:
    """The last ``capacity`` neuron nonces a cortex saw, so it can refuse a replayed hello.

    One instance is shared by all of a cortex's handshakes. Bounded by count, not time, so
    it needs no clock; a genuine neuron draws a fresh 256-bit nonce per hello and never
    repeats one.
    """

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._seen: dict[bytes, None] = {}  # insertion-ordered: the oldest goes first

    def add(self, nonce: bytes) -> bool:
        """Remember ``nonce``; False if it was already remembered."""
        if nonce in self._seen:
            return False
        self._seen[nonce] = None
        if len(self._seen) > self.capacity:
            del self._seen[next(iter(self._seen))]
        return True

    def __len__(self) -> int:
        return len(self._seen)


class _Session:
    """What both sides share: the state, the verdict, the table walk and the deadline."""

    _TABLE: ClassVar[dict[tuple[State, type], Callable[[Any, Any], list[object]]]]
    """(state, message type) -> the handler, which returns what to send and moves the state."""
    _role: ClassVar[str]

    def __init__(self, state: State, timeout: float) -> None:
        self.state = state
        self.verdict: Verdict | None = None
        self.timeout = timeout
        """Seconds the whole handshake may take; the shell calls :meth:`expire` after it."""

    def receive(self, msg: object) -> list[object]:
        """Feed one message from the peer; returns the messages to send, in order."""
        if self.verdict is not None:
            raise RuntimeError(f"the {self._role} join session is over ({self.state.value})")
        handler = self._TABLE.get((self.state, type(msg)))
        if handler is not None:
            return handler(self, msg)
        expected = self.state.value.removeprefix("await_")
        if isinstance(msg, Fault):
            return self._settle(State.FAILED, Failure(msg.code, f"the peer reported a fault: {msg.message}"))
        reason = f"expected {expected}, got {type(msg).__name__}"
        return self._settle(State.FAILED, Failure("unexpected", reason), Fault("unexpected", reason))

    def expire(self) -> None:
        """The shell's deadline passed before a verdict: the peer went silent."""
        if self.verdict is None:
            self._settle(State.FAILED, Failure("timeout", f"the handshake did not finish within {self.timeout:g}s"))

    def _settle(self, state: State, verdict: Verdict, *send: object) -> list[object]:
        self.state = state
        self.verdict = verdict
        return list(send)


# --- the cortex --------------------------------------------------------------------------


class CortexJoin(_Session):
    """The cortex's side of one neuron's join.

    Args:
        token: returns the operator's join token; called once, when the join arrives (so a
            rotated token applies at once). ``OSError`` or ``ValueError`` from it refuses
            the neuron with ``"unavailable"``.
        recent: the neuron nonces seen lately, shared by all of this cortex's handshakes.
        bound: the identity key a node id is bound to (None: none yet); called once, when
            the join arrives.
        strict: refuse a node id bound to no key (:data:`~.join_identity.NOT_ENROLLED`) instead of admitting it.
        heartbeat_interval, operator, cortex_id: what the challenge and welcome tell.
        timeout: the handshake deadline the shell applies.
        versions: the protocol versions this cortex speaks, oldest and newest.
        nonce, session_id: fixed values for tests (fresh random ones by default).
    """

    _role = "cortex"

    def __init__(
        self,
        token: Callable[[], str],
        *,
        recent: RecentNonces,
        heartbeat_interval: float,
        timeout: float,
        bound: Callable[[str], bytes | None] = lambda node_id: None,
        strict: bool = False,
        operator: str = "",
        cortex_id: str = "",
        versions: tuple[int, int] = JOIN_VERSIONS,
        nonce: bytes | None = None,
        session_id: str | None = None,
    ) -> None:
        super().__init__(State.AWAIT_HELLO, timeout)
        self._token = token
        self._recent = recent
        self._bound = bound
        self._strict = strict
        self._interval = heartbeat_interval
        self._operator = operator
        self._cortex_id = cortex_id
        self._versions = versions
        self._nonce = nonce if nonce is not None else auth.new_nonce()
        self._session_id = session_id if session_id is not None else secrets.token_hex(8)
        self._hello: Hello | None = None
        self._version = 0

    @property
    def node_id(self) -> str | None:
        """The node id the neuron claimed in its hello (None before it)."""
        return self._hello.node_id if self._hello is not None else None

    def _refuse(self, code: str, reason: str) -> list[object]:
        return self._settle(State.REFUSED, Refusal(code, reason), Refused(code, reason))

    def screen(self, frame: bytes) -> str | None:
        """Why ``frame`` (raw, not yet decoded) is refused unread, or None
        (:func:`helexa.protocol.join_screen.screen`: for an address being throttled)."""
        return join_screen.screen(frame, awaiting_join=self.state is State.AWAIT_JOIN, proves=self._proves)

    def _proves(self, proof: bytes) -> bool:
        hello = self._hello
        try:
            token = self._token()
        except (OSError, ValueError):
            return True  # the cortex's own fault: the join is judged (and turned away to retry) as usual
        return hello is not None and auth.verify(auth.join_proof(token, self._nonce, hello.nonce, hello.node_id), proof)

    def _hello(self, hello: Hello) -> list[object]:
        self._hello = hello
        if (problem := node_id_problem(hello.node_id)) is not None:
            return self._refuse("bad_request", problem)
        if len(hello.nonce) != auth.NONCE_BYTES:
            return self._refuse("bad_request", f"the hello nonce must be {auth.NONCE_BYTES} bytes")
        if not self._recent.add(hello.nonce):
            return self._refuse("replayed_nonce", f"neuron {hello.node_id!r} sent a nonce this cortex saw recently")
        version = choose_version(self._versions, (hello.min_version, hello.max_version))
        if version is None:
            lo, hi = self._versions
            return self._refuse(
                "version_mismatch",
                f"neuron {hello.node_id!r} speaks protocol versions {hello.min_version}..{hello.max_version}; "
                f"this cortex speaks {lo}..{hi}",
            )
        self._version = version
        self.state = State.AWAIT_JOIN
        return [Challenge(self._nonce, version, self._cortex_id)]

    def _join(self, join: Join) -> list[object]:
        hello = self._hello
        assert hello is not None
        if join.descriptor.node_id != hello.node_id:
            return self._refuse("bad_request", "the join descriptor names another node id than hello")
        try:
            token = self._token()
        except (OSError, ValueError):
            return self._refuse("unavailable", "the cortex cannot read its join token")
        expected = auth.join_proof(token, self._nonce, hello.nonce, hello.node_id)
        if not auth.verify(expected, join.proof):
            return self._refuse(
                "unauthorized", f"neuron {hello.node_id!r}: the join proof does not match this cortex's join token"
            )
        key = join.public_key
        statement = auth.identity_statement(self._nonce, hello.nonce, hello.node_id)
        refusal = identity_refusal(hello.node_id, key, join.signature, statement, self._bound, strict=self._strict)
        if refusal is not None:
            return self._refuse(*refusal)
        welcome = Welcome(
            auth.welcome_proof(token, self._nonce, hello.nonce, hello.node_id),
            session_id=self._session_id,
            heartbeat_interval=self._interval,
            operator=self._operator,
        )
        admitted = Admitted(hello.node_id, self._version, self._session_id, join.descriptor, join.models,
                            join.configs, key, join.cached[:MAX_CACHE_REPORT])
        return self._settle(State.JOINED, admitted, welcome)

    _TABLE = {(State.AWAIT_HELLO, Hello): _hello, (State.AWAIT_JOIN, Join): _join}


# --- the neuron --------------------------------------------------------------------------


class NeuronJoin(_Session):
    """The neuron's side of one join.

    Args:
        token: the operator's join token (never sent; only proofs over it are).
        descriptor: who this neuron is; its ``node_id`` is the one the hello claims.
        models, configs: what the neuron already holds, so a restarted cortex rebuilds its view.
        cached: the cache keys of the sources in its model cache, sent to a cortex of version 3.
        identity: the neuron's identity key, sent with a signature to a cortex of version 2
            (None: none sent, as a version-1 neuron).
        timeout: the handshake deadline the shell applies.
        versions: the protocol versions this neuron speaks, oldest and newest.
        nonce: a fixed nonce for tests (a fresh random one by default).

    Call :meth:`start` once for the hello, then :meth:`receive` each cortex message.
    """

    _role = "neuron"

    def __init__(
        self,
        token: str,
        descriptor: NeuronDescriptor,
        *,
        timeout: float,
        models: tuple[ModelStatus, ...] = (),
        configs: tuple[ModelConfig, ...] = (),
        cached: tuple[str, ...] = (),
        identity: Identity | None = None,
        versions: tuple[int, int] = JOIN_VERSIONS,
        nonce: bytes | None = None,
    ) -> None:
        super().__init__(State.START, timeout)
        self._cached = cached
        self._token = token
        self._identity = identity
        self._descriptor = descriptor
        self._models = models
        self._configs = configs
        self._versions = versions
        self.nonce = nonce if nonce is not None else auth.new_nonce()
        self._challenge: Challenge | None = None

    @property
    def node_id(self) -> str:
        return self._descriptor.node_id

    def start(self) -> list[object]:
        """The hello that opens the handshake."""
        if self.state is not State.START:
            raise RuntimeError("the neuron join session has already started")
        self.state = State.AWAIT_CHALLENGE
        lo, hi = self._versions
        return [Hello(self.node_id, lo, hi, self.nonce, self._descriptor.software)]

    def _challenge(self, challenge: Challenge) -> list[object]:
        lo, hi = self._versions
        if not lo <= challenge.version <= hi:
            return self._settle(
                State.REFUSED,
                Refusal(
                    "version_mismatch",
                    f"the cortex chose protocol version {challenge.version}; this neuron speaks {lo}..{hi}",
                ),
            )
        if challenge.nonce == self.nonce:
            # A peer that reflects our nonce may be relaying our own proof back at us.
            return self._settle(State.IMPOSTOR, Impostor("the cortex's challenge reflects this neuron's own nonce"))
        self._challenge = challenge
        self.state = State.AWAIT_WELCOME
        proof = auth.join_proof(self._token, challenge.nonce, self.nonce, self.node_id)
        key = signature = b""
        if self._identity is not None and challenge.version >= IDENTITY_VERSION:
            key = self._identity.public_bytes
            signature = self._identity.sign(auth.identity_statement(challenge.nonce, self.nonce, self.node_id))
        cached = self._cached[:MAX_CACHE_REPORT] if challenge.version >= CACHE_REPORT_VERSION else ()
        return [Join(proof, self._descriptor, self._models, self._configs, key, signature, cached)]

    def _refused(self, refused: Refused) -> list[object]:
        return self._settle(State.REFUSED, Refusal(refused.code, refused.reason))

    def _welcome(self, welcome: Welcome) -> list[object]:
        challenge = self._challenge
        assert challenge is not None
        expected = auth.welcome_proof(self._token, challenge.nonce, self.nonce, self.node_id)
        if not auth.verify(expected, welcome.proof):
            return self._settle(State.IMPOSTOR, Impostor("the cortex could not prove it holds our join token"))
        verdict = Welcomed(
            challenge.version, welcome.session_id, welcome.heartbeat_interval, welcome.operator, challenge.cortex_id
        )
        return self._settle(State.JOINED, verdict)

    _TABLE = {
        (State.AWAIT_CHALLENGE, Challenge): _challenge,
        (State.AWAIT_CHALLENGE, Refused): _refused,
        (State.AWAIT_WELCOME, Welcome): _welcome,
        (State.AWAIT_WELCOME, Refused): _refused,
    }
