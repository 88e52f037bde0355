"""What a frame must leave out for a peer of an earlier release.

A codec refuses a frame with a field it does not know (``unknown field(s)``), and a peer
that receives one closes the connection or stream it came on. A field added later is
therefore an :func:`~.codec.added_field`, left out of a frame while it holds its default;
this module decides, for a peer that may be of an earlier release, which such fields are
set back to their defaults before the frame goes to it.

Who counts as earlier: a neuron or cortex that joined at a handshake version before the
newest (:data:`~.join.JOIN_VERSIONS`), and a peer cortex on a request stream of a protocol
before the newest (:data:`~.federation.FEDERATION_VERSIONS` gives each its version here).
Those of version 1 (before :data:`~.join.IDENTITY_VERSION`, and ``/helexa/federation/1``)
include releases that predate each of these fields:

========================  =====================================================================
field                     what the earlier peer gets instead
========================  =====================================================================
``GenerateRequest``       no ``cache_scope``: its prompt cache is one for all tenants, as
                          before
``EmbedRequest``          no ``truncate``: it cuts an over-long input (the releases before the
                          field always did), or refuses it with ``context_length_exceeded``
                          (the releases that have it, when it is left out); this release,
                          not told (a cortex before the field), cuts as that cortex did
``GenerateResult``        no ``first_token_s``: an Ollama answer's timings from an earlier
                          cortex put the whole run in ``eval_duration``, as before
========================  =====================================================================

and those of version 2 (before :data:`~.join.CACHE_REPORT_VERSION`, and
``/helexa/federation/2``: helexa 186c5c3 of 2026-12-02 and earlier) know all of those but
not these:

========================  =====================================================================
field                     what the earlier peer gets instead
========================  =====================================================================
``TokenChunk``            no ``prompt_tokens`` (the first chunk's): that cortex bills a cut
                          stream's prompt as it did (its own count, else an estimate)
``Heartbeat``             no ``cached``: that cortex learns what a neuron's model cache holds
                          only from the models it configures there (``ModelStatus.cached``);
                          the join's own ``cached`` the handshake leaves out
========================  =====================================================================

Pure: no I/O; the shells (the cortex's neuron link, the neuron's connection, federation's
streams) call :func:`for_earlier` on what they send to such a peer.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TypeVar

from .inference import EmbedRequest, GenerateRequest, GenerateResult, TokenChunk
from .join import CACHE_REPORT_VERSION, IDENTITY_VERSION
from .messages import Heartbeat

T = TypeVar("T")


def for_earlier(msg: T, version: int = 1) -> T:
    """``msg`` as a peer of an earlier release, joined at handshake ``version``, can decode
    it: each field newer than that release set back to its default (so the encoder leaves
    it out). Other messages are returned as they are."""
    if type(msg) is TokenChunk:  # the most frequent frame: one test, and a copy of the first chunk only
        stale = msg.prompt_tokens is not None and version < CACHE_REPORT_VERSION
        return replace(msg, prompt_tokens=None) if stale else msg  # type: ignore[return-value]
    if isinstance(msg, Heartbeat):
        stale = msg.cached is not None and version < CACHE_REPORT_VERSION
        return replace(msg, cached=None) if stale else msg  # type: ignore[return-value]
    if version >= IDENTITY_VERSION:
        return msg
    if isinstance(msg, GenerateRequest):
        return replace(msg, cache_scope="") if msg.cache_scope else msg  # type: ignore[return-value]
    if isinstance(msg, GenerateResult):
        return replace(msg, first_token_s=None) if msg.first_token_s is not None else msg  # type: ignore[return-value]
    if isinstance(msg, EmbedRequest):
        return replace(msg, truncate=None) if msg.truncate is not None else msg  # type: ignore[return-value]
    return msg
