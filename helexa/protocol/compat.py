"""What a frame must leave out for a peer of an earlier release.

A codec refuses a frame with a field it does not know (``unknown field(s)``), and a peer
that receives one closes the connection or stream it came on. A field added later is
therefore an :func:`~.codec.added_field`, left out of a frame while it holds its default;
this module decides, for a peer that may be of an earlier release, which such fields are
set back to their defaults before the frame goes to it.

Who counts as earlier: a neuron or cortex that joined at handshake version 1 (before
:data:`~.join.IDENTITY_VERSION`), and a peer cortex on a ``/helexa/federation/1`` stream
(before :data:`~.federation.SCOPED_FEDERATION_PROTOCOL`). Their releases include ones that
predate each of these fields:

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
``TokenChunk``            no ``prompt_tokens`` (the first chunk's): an earlier cortex bills a
                          cut stream's prompt as it did (its own count, else an estimate)
========================  =====================================================================

Pure: no I/O; the shells (the cortex's neuron link, the neuron's connection, federation's
streams) call :func:`for_earlier` on what they send to such a peer.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TypeVar

from .inference import EmbedRequest, GenerateRequest, GenerateResult, TokenChunk

T = TypeVar("T")


def for_earlier(msg: T) -> T:
    """``msg`` as a peer of an earlier release can decode it: each field newer than that
    release set back to its default (so the encoder leaves it out). Other messages are
    returned as they are."""
    if type(msg) is TokenChunk:  # the most frequent frame: one test, and a copy of the first chunk only
        return replace(msg, prompt_tokens=None) if msg.prompt_tokens is not None else msg  # type: ignore[return-value]
    if isinstance(msg, GenerateRequest):
        return replace(msg, cache_scope="") if msg.cache_scope else msg  # type: ignore[return-value]
    if isinstance(msg, GenerateResult):
        return replace(msg, first_token_s=None) if msg.first_token_s is not None else msg  # type: ignore[return-value]
    if isinstance(msg, EmbedRequest):
        return replace(msg, truncate=None) if msg.truncate is not None else msg  # type: ignore[return-value]
    return msg
