"""The asking portal's routing preferences, for the request being served.

The metering path sets :data:`ASK_POLICY` around its call to the orchestrator; the
federation's router (:class:`~..peering.PeerRouter`) reads it when the orchestrator asks
it for a peer, and narrows the operator's outbound policy with it. A context variable
rather than an argument because the orchestrator's ``RemoteRouter`` contract takes only
the request, and the preference is the request's own: trio gives each task its own
context, so concurrent requests of different portals never see each other's.
"""

from __future__ import annotations

from contextvars import ContextVar

from ..federation.policy import AskPolicy

ASK_POLICY: ContextVar[AskPolicy | None] = ContextVar("helexa_portal_ask_policy", default=None)
