"""The states of an HTTP/1.1 server connection and every transition between them, in one
table (h11's ``_state.py`` is the model; :mod:`.connection` is the object that walks it).

Each side has its own state: the client's follows what the client sent (a head, a body,
its close), the server's what the app answered. A :class:`Trigger` moves every side whose
table names it (``REQUEST`` moves both: the client to ``BODY``, the server to
``SEND_RESPONSE``); a trigger not allowed in a side's current state is a bug.

A request answered in one piece, on a connection that stays open::

    trigger         client    server
                    IDLE      IDLE
    BYTES           HEAD
    REQUEST         BODY      SEND_RESPONSE
    BODY_END        DONE
    START                     HEAD_HELD
    RESPONSE_END              DONE
    NEXT_CYCLE      IDLE      IDLE

A streamed response passes ``BODY_PART`` (``HEAD_HELD`` → ``SEND_BODY``) before
``RESPONSE_END``; a connection that does not stay open gets ``CLOSE`` instead of
``NEXT_CYCLE``, and both sides end in ``CLOSED``.
"""

from __future__ import annotations

import enum


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"

    __hash__ = object.__hash__  # members are unique: hash by identity, in C (Enum's is Python)


class State(enum.Enum):
    IDLE = "idle"                    # both: between exchanges (client: no byte of a head yet)
    HEAD = "head"                    # client: part of a request head has arrived
    BODY = "body"                    # client: the head was handed out, the app has not had all the body
    DONE = "done"                    # both: the request was read / the response was written
    ERROR = "error"                  # client: a malformed head or body, or one that did not arrive
    SEND_RESPONSE = "send_response"  # server: the app is running and has not started its response
    HEAD_HELD = "head_held"          # server: the app started its response; the head waits for the body
    SEND_BODY = "send_body"          # server: the head went out; more body is to come
    CLOSED = "closed"                # both: the connection is over (client: it closed or went away)

    __hash__ = object.__hash__


class Trigger(enum.Enum):
    BYTES = "bytes"                  # the first bytes of a head arrived
    REQUEST = "request"              # a whole, valid head was parsed
    DATA = "data"                    # a part of the body was handed to the app
    BODY_END = "body_end"            # the last of the body was handed out (or skipped)
    EOF = "eof"                      # the client closed its side, or a write to it failed
    MALFORMED = "malformed"          # the client broke HTTP/1.1
    TIMEOUT = "timeout"              # the deadline of the current wait passed
    START = "start"                  # the app sent http.response.start
    BODY_PART = "body_part"          # a part of the response body went out, more to come
    RESPONSE_END = "response_end"    # the last part of the response went out
    FALLBACK = "fallback"            # the server answered for an app that returned without answering
    NEXT_CYCLE = "next_cycle"        # the exchange ended and the connection stays open
    CLOSE = "close"                  # the connection ends

    __hash__ = object.__hash__


S, T = State, Trigger
TRANSITIONS: dict[Role, dict[State, dict[Trigger, State]]] = {
    Role.CLIENT: {
        S.IDLE: {T.BYTES: S.HEAD, T.EOF: S.CLOSED, T.TIMEOUT: S.CLOSED, T.CLOSE: S.CLOSED},
        S.HEAD: {T.REQUEST: S.BODY, T.EOF: S.CLOSED, T.MALFORMED: S.ERROR, T.TIMEOUT: S.ERROR,
                 T.CLOSE: S.CLOSED},
        S.BODY: {T.DATA: S.BODY, T.BODY_END: S.DONE, T.EOF: S.CLOSED, T.MALFORMED: S.ERROR,
                 T.TIMEOUT: S.ERROR, T.CLOSE: S.CLOSED},
        S.DONE: {T.NEXT_CYCLE: S.IDLE, T.EOF: S.CLOSED, T.CLOSE: S.CLOSED},
        S.ERROR: {T.CLOSE: S.CLOSED},
        S.CLOSED: {T.CLOSE: S.CLOSED},
    },
    Role.SERVER: {
        S.IDLE: {T.REQUEST: S.SEND_RESPONSE, T.CLOSE: S.CLOSED},
        S.SEND_RESPONSE: {T.START: S.HEAD_HELD, T.FALLBACK: S.DONE, T.CLOSE: S.CLOSED},
        S.HEAD_HELD: {T.BODY_PART: S.SEND_BODY, T.RESPONSE_END: S.DONE, T.FALLBACK: S.DONE,
                      T.CLOSE: S.CLOSED},
        S.SEND_BODY: {T.BODY_PART: S.SEND_BODY, T.RESPONSE_END: S.DONE, T.CLOSE: S.CLOSED},
        S.DONE: {T.NEXT_CYCLE: S.IDLE, T.CLOSE: S.CLOSED},
        S.CLOSED: {},
    },
}
"""``TRANSITIONS[role][state][trigger]`` is the state ``role`` moves to; a trigger named
for both roles moves both."""
del S, T


def _moves(role: Role, trigger: Trigger) -> dict[State, State] | None:
    moves = {state: triggers[trigger] for state, triggers in TRANSITIONS[role].items() if trigger in triggers}
    return moves or None


MOVES = {trigger: (_moves(Role.CLIENT, trigger), _moves(Role.SERVER, trigger)) for trigger in Trigger}
"""The table by trigger, for :meth:`.Connection._fire`: ``(client moves, server moves)``."""
