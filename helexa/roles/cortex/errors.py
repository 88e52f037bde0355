"""The gateway's errors, and the one place they become OpenAI's error envelope.

Everything the gateway, the provisioner and the dispatcher raise toward a client is a
:class:`GatewayError`; :func:`to_gateway_error` maps anything else (the fleet's errors,
a bug) onto the tree, and :func:`envelope` renders the ``{"error": {...}}`` body. No
traceback or exception text from an unexpected error ever reaches a client.

Exception tree (HTTP status, OpenAI ``type``)::

    GatewayError                      500 internal_error
    ├── BadRequest                    400 invalid_request_error   (bad JSON, wrong types)
    ├── Unauthorized                  401 invalid_request_error   code invalid_api_key
    ├── NotFound                      404 invalid_request_error   (unknown path)
    │   └── ModelNotFound             404 invalid_request_error   code model_not_found
    ├── Forbidden                     403 permission_error        a federation policy (not a key's model: 404)
    ├── MethodNotAllowed              405 invalid_request_error
    ├── RequestTimeout                408 invalid_request_error   the body came too slowly (the connection closes)
    ├── PayloadTooLarge               413 invalid_request_error
    ├── RateLimited                   429 rate_limit_error        (+ Retry-After, x-ratelimit-*)
    │   └── InsufficientQuota         429 insufficient_quota      a budget is spent
    ├── NoCapacity                    503 service_unavailable     (+ Retry-After)
    │   └── ColdLoadFailed            503 service_unavailable     a cold load failed
    ├── UpstreamError                 502 upstream_error          the neuron failed it
    └── UpstreamTimeout               504 timeout                 no answer in time

Federation errors (:mod:`.federation.errors`) map as: ``OutboundRefused`` and a peer's
``denied`` refusal → 403; ``NoPeerOffers`` → 404; a peer's ``rate_limited`` → 429 and
``busy`` / ``not_serving`` / ``model_not_offered`` (a stale offer) → 503, with Retry-After;
``PeerUnreachable`` → 502 (504 when it timed out); ``PeerVanished`` → 502 (an SSE error
event once streaming); ``PeerFailed`` → as the same failure on a local neuron.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from typing import Any, NoReturn

from ... import logs
from .federation.errors import (
    FederationError,
    NoPeerOffers,
    OutboundRefused,
    PeerFailed,
    PeerRefused,
    PeerUnreachable,
    PeerVanished,
)
from .fleet import CommandTimeout, FleetError, NeuronGone, RemoteError
from .http import ClientGone  # the client went away: nobody is left to answer (not a GatewayError)

log = logging.getLogger(__name__)


NO_RETRY = (b"x-should-retry", b"false")
"""Tells the official OpenAI and Anthropic clients not to retry a request on their own."""


class GatewayError(Exception):
    """Base of the tree; ``status``, ``type`` and ``code`` say how a client sees it."""

    status = 500
    type = "internal_error"
    code: str | None = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def headers(self) -> list[tuple[bytes, bytes]]:
        """Extra response headers (``Retry-After`` for 503)."""
        return []


class BadRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = None


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class Conflict(GatewayError):
    """The request contradicts the state it would change (a node id bound to another key)."""

    status = 409
    type = "invalid_request_error"
    code = "conflict"


class ModelNotFound(NotFound):
    code = "model_not_found"

    def __init__(self, model: str, why: str = "") -> None:
        super().__init__(why or f"The model '{model}' does not exist or is not served here", param="model")


class Unauthorized(GatewayError):
    """No key, or a wrong, revoked or expired one, on a portal that needs keys."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"www-authenticate", b'Bearer realm="helexa"')]


class Forbidden(GatewayError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class MethodNotAllowed(GatewayError):
    """A method the path does not take; ``allow``: those it does (the ``Allow`` header)."""

    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"

    def __init__(self, message: str, *, allow: tuple[str, ...] = (), param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message, param=param, code=code)
        self.allow = tuple(sorted(set(allow)))

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"allow", ", ".join(self.allow).encode())] if self.allow else []


class RequestTimeout(GatewayError):
    """The request's body did not arrive in time; the connection closes after the answer
    (the rest of the body may still come)."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"connection", b"close")]


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class RateLimited(GatewayError):
    """Too many requests; the client should retry after ``retry_after`` s. ``extra``
    headers go with it (a portal's ``x-ratelimit-*``).

    ``retry=False``: retrying the same request cannot help (it is larger than the limit
    itself, or the budget does not renew soon): ``x-should-retry: false``, which the
    official OpenAI and Anthropic clients obey, and no ``Retry-After`` when
    ``retry_after`` is None (nothing changes until an operator acts)."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limited"
    retry = True

    def __init__(self, message: str, *, retry_after: float | None = 1.0, code: str | None = None,
                 extra: list[tuple[bytes, bytes]] | None = None, retry: bool | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after
        self.extra = extra or []
        if retry is not None:
            self.retry = retry

    def headers(self) -> list[tuple[bytes, bytes]]:
        out = [] if self.retry else [NO_RETRY]
        if self.retry_after is not None:
            out += [(b"retry-after", str(max(1, math.ceil(self.retry_after))).encode()),
                    (b"retry-after-ms", str(max(1, math.ceil(self.retry_after * 1000))).encode())]
        return out + self.extra


class InsufficientQuota(RateLimited):
    """A budget is spent: nothing more until its period ends (``retry_after``, None for a
    budget that never renews) or an operator raises it. Never worth an automatic retry."""

    type = "insufficient_quota"
    code = "insufficient_quota"
    retry = False


class NoCapacity(GatewayError):
    """Nothing can serve the request now; the client should retry after ``retry_after`` s."""

    status = 503
    type = "service_unavailable"
    code = "no_capacity"

    def __init__(self, message: str, *, retry_after: float = 1.0, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"retry-after", str(max(1, math.ceil(self.retry_after))).encode())]


class ColdLoadFailed(NoCapacity):
    """A load failed. Its ``message`` is the operator's (which neuron, the neuron's own
    words: a file's path...); a client sees :meth:`for_client` instead, through
    :func:`to_gateway_error`, and the log gets the detail beside the request id."""

    code = "load_failed"

    def __init__(self, message: str, *, retry_after: float = 1.0, code: str | None = None,
                 model: str | None = None, reason: str | None = None) -> None:
        super().__init__(message, retry_after=retry_after, code=code)
        self.model = model
        self.reason = reason
        """The neuron's own code (``disk_full``, ``hash_mismatch``...), for the operator
        (``helexa models``' error events); a client sees ``code`` alone."""

    def for_client(self) -> NoCapacity:
        """What a client may learn: the model could not be loaded, with the request id the
        operator can find the detail under. Logs the detail for that request."""
        request_id = logs.current().get("request_id")
        what = f"model {self.model!r}" if self.model else "the model"
        log.warning("request %s: %s could not be loaded: %s", request_id or "-", what, self.message)
        text = f"{what} could not be loaded; the operator has been told"
        if request_id:
            text += f" (request {request_id})"
        return NoCapacity(text, retry_after=self.retry_after, code=self.code)


def as_asked(exc: BaseException, asked: str, served: str) -> BaseException | None:
    """What a portal's client must see instead of ``exc`` when it names the catalogue model
    ``served`` behind the portal's alias ``asked`` (None: ``exc`` as it is). A portal never
    reveals the model behind an alias: not in a 404, nor in a failed load's message."""
    if asked == served:
        return None
    if isinstance(exc, ModelNotFound):
        return ModelNotFound(asked)
    if isinstance(exc, ColdLoadFailed):  # its message is the operator's; the client's names exc.model
        if exc.model is None:
            return None
        return ColdLoadFailed(exc.message, retry_after=exc.retry_after, code=exc.code, model=asked)
    if isinstance(exc, GatewayError) and repr(served) in exc.message:
        # "no usable neuron for model 'chat' right now", "the queue for model 'chat' is full"...
        public = copy.copy(exc)
        public.message = exc.message.replace(repr(served), repr(asked))
        public.args = (public.message,)
        return public
    return None


class UpstreamError(GatewayError):
    status = 502
    type = "upstream_error"
    code = "upstream_error"


class UpstreamTimeout(GatewayError):
    status = 504
    type = "timeout"
    code = "timeout"


# Neuron-side codes that mean the client asked for something wrong, not that we failed.
_CLIENT_CODES = frozenset({"invalid_request", "unsupported", "context_length_exceeded"})
_CLIENT_PARAMS = {"context_length_exceeded": "messages"}


def embed_error(exc: BaseException, param: str) -> BaseException:
    """``exc`` as an embeddings request answers it: an input over the model's context is a
    400 naming the input field (``param``), not ``messages``."""
    if isinstance(exc, RemoteError) and exc.code == "context_length_exceeded":
        return BadRequest(str(exc), code=exc.code, param=param)
    return exc


def reraise_named(exc: BaseException, named: BaseException) -> NoReturn:
    """Raise ``named``, :func:`schema_field`'s answer for ``exc``, in its place: ``exc``
    itself as it was where it named no field, else the client's 400 without ``exc`` as its
    context."""
    if named is exc:
        raise exc
    raise named from None


_SCHEMA_REFUSALS = ("json schema", "grammar")
"""Words of llama.cpp's refusal of a schema it cannot turn into a grammar (``JSON schema
error at #/...``, ``failed to parse grammar``): one the edge's checks
(:mod:`.schema_check`) did not foresee."""


def schema_field(exc: BaseException, request: Any, *, tools: str, fmt: str | None) -> BaseException:
    """``exc`` naming the field a client sent when it is the neuron refusing ``request``'s
    schema as a grammar: a 400 whose ``param`` is ``tools`` (the surface's word, a tool's
    schema) or ``fmt`` (its structured-output field), and whose message says which (an
    Anthropic or Ollama client reads no ``param``). With both in the request, llama.cpp's
    path into its combined schema (``tool_call``, ``arguments``) says it was a tool's."""
    if not (isinstance(exc, RemoteError) and exc.code == "invalid_request"):
        return exc
    text = str(exc)
    if not any(word in text.lower() for word in _SCHEMA_REFUSALS):
        return exc
    has_tools, has_format = bool(getattr(request, "tools", ())), getattr(request, "response_format", None) is not None
    if has_tools and (not has_format or fmt is None or "tool_call" in text or "arguments" in text):
        param = tools
    elif has_format and fmt is not None:
        param = fmt
    else:
        return exc
    return BadRequest(f"Invalid value for '{param}': the backend cannot turn its schema into a grammar: {text}",
                      code=exc.code, param=param)


def client_gone(exc: BaseException) -> bool:
    """Whether ``exc`` is only the client going away: a :class:`ClientGone`, or a group (a
    nursery's) of nothing else. An ordinary disconnect, never an error to log."""
    if isinstance(exc, BaseExceptionGroup):
        return all(client_gone(e) for e in exc.exceptions)
    return isinstance(exc, ClientGone)


def to_gateway_error(exc: BaseException, *, operator: bool = False) -> GatewayError:
    """Map any exception onto the tree, as a client may see it. Unexpected ones are logged
    with their traceback here and become a bare 500 whose message says nothing about the
    internals; a failed load says only which model (:meth:`ColdLoadFailed.for_client`)
    unless ``operator`` (the admin socket). A client that went away (:class:`ClientGone`)
    is no fault: it is not logged as one."""
    match exc:
        case ColdLoadFailed() if not operator:
            return exc.for_client()
        case GatewayError():
            return exc
        case _ if client_gone(exc):
            log.debug("the client went away: %s", exc)
            return GatewayError("the client went away", code="client_gone")
        case RemoteError(code=code) if code in _CLIENT_CODES:
            return BadRequest(str(exc), code=code, param=_CLIENT_PARAMS.get(code))
        case RemoteError(retryable=True):
            return NoCapacity(str(exc), code=exc.code)
        case RemoteError():
            return UpstreamError(str(exc), code=exc.code)
        case NeuronGone():
            return UpstreamError("the neuron serving this request went away", code="neuron_gone")
        case CommandTimeout():
            return UpstreamTimeout(str(exc))
        case FleetError():
            return UpstreamError(str(exc))
        case FederationError():
            return _federation_error(exc)
    log.error("unexpected error while serving a request", exc_info=exc)
    return GatewayError("internal error")


_PEER_POLICY_CODES = frozenset({"denied"})
"""A peer's refusals that are its policy about us. ``model_not_offered`` / ``not_serving``
for a model it announced mean the announcement went stale (it restarted, its neuron left,
its policy changed): a 503 until its next announcement says so, like ``busy``."""


def _federation_error(exc: FederationError) -> GatewayError:
    message = str(exc)
    match exc:
        case OutboundRefused():
            return Forbidden(message, code="outbound_refused")
        case NoPeerOffers():
            return NotFound(message, param="model", code="model_not_found")
        case PeerRefused(code="rate_limited"):
            return RateLimited(message, retry_after=exc.retry_after or 1.0, code="peer_rate_limited")
        case PeerRefused(code=code) if code in _PEER_POLICY_CODES:
            return Forbidden(message, code=f"peer_{code}")
        case PeerRefused():
            return NoCapacity(message, retry_after=exc.retry_after or 1.0, code=f"peer_{exc.code}")
        case PeerUnreachable() if "timed out" in message or "in time" in message:
            return UpstreamTimeout(message, code="peer_timeout")
        case PeerUnreachable():
            return UpstreamError(message, code="peer_unreachable")
        case PeerVanished():
            return UpstreamError(message, code="peer_vanished")
        case PeerFailed(code=code) if code in _CLIENT_CODES:
            return BadRequest(message, code=code, param=_CLIENT_PARAMS.get(code))
        case PeerFailed(code="model_not_found"):
            return NotFound(message, param="model", code="model_not_found")
        case PeerFailed(retryable=True):
            return NoCapacity(message, code=exc.code)
        case PeerFailed(code="timeout"):
            return UpstreamTimeout(message)
    return UpstreamError(message, code=exc.code)


def error_body(error: GatewayError) -> dict[str, Any]:
    """The OpenAI envelope for ``error``."""
    return {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}


def envelope(exc: BaseException, *, operator: bool = False) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """``(status, headers, body)`` of the JSON error response for ``exc`` (``operator``: on
    the admin socket, where a failed load keeps its detail)."""
    error = to_gateway_error(exc, operator=operator)
    body = json.dumps(error_body(error)).encode()
    headers = [(b"content-type", b"application/json"), *error.headers()]
    return error.status, headers, body
