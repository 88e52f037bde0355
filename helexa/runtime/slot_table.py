"""Which llama.cpp slot a request should run in, so that a conversation finds its prefix.

llama.cpp keeps, per slot, the KV cache of the last prompt it ran (and the answer it
generated) and reuses the longest common prefix with the next prompt that slot gets. Left
to itself, the server gives a request the idle slot whose cached prompt is most *similar*
(above ``slot_prompt_similarity``), else the least recently used one. Conversations that
share a long system prompt are all similar, so under light load every request lands on
the slot used last: each conversation overwrites the one before it and the other slots
stay empty (measured with SmolLM2 and 2 slots: the second turn of a conversation
prefilled 134 tokens after another conversation's turn, 15 when sent back to its own slot).

:class:`SlotTable` chooses the slot itself (the request's ``id_slot``), from what it sent
to each slot:

1. an idle slot whose whole last prompt the new prompt repeats (the conversation goes on
   there), the longest such;
2. else an empty idle slot (spare cache: nothing is lost);
3. else the least recently used idle slot.

It is pure: the backend renders the prompt to text (:func:`render_chat`), asks
:meth:`~SlotTable.choose` (None: every slot is busy, wait), and tells
:meth:`~SlotTable.release` what the slot holds afterwards.

Embeddings take a slot too, but llama.cpp chooses it itself (it ignores ``id_slot`` for
them: by prompt similarity, else the least recently used idle slot). :meth:`~SlotTable.borrow`
marks busy the slot it most likely takes (the least recently used idle one), so that no
generation is sent to wait behind it while another slot is free, and
:meth:`~SlotTable.give_back` returns it, with what it held (llama.cpp's host-memory prompt
cache saves and restores the conversation's state) or emptied (that cache off).

Cache scopes: a request carries the scope of its caller (the cortex's opaque hash of its
portal and API key, ``GenerateRequest.cache_scope``), and a prefix computed for one scope
is never reused for another, or one tenant could tell from its time to first token what
another recently sent. :meth:`~SlotTable.choose` sends a conversation back only to a slot
its own scope filled, and :meth:`~SlotTable.reuses` says whether the request may reuse what
llama.cpp holds (else it is sent with ``cache_prompt: false``, and llama.cpp computes the
whole prompt afresh): not in a slot another scope filled; and while llama.cpp's host-memory
prompt cache is on (``saves``), which hands a request the saved state (of any slot, any
earlier request) sharing more of its prompt than its slot does, not while a state another
scope left (saved when a request took its slot, or still in a slot) shares more of the
prompt than the slot does. (Characters are compared here, tokens there: a state sharing as
many characters may share a token more at the border, which neither shows in the time to
first token nor tells anything past what the slot itself shares.) The table remembers the
states llama.cpp may have saved (:data:`SAVED_CHARS`; a state that another of its scope
extends is dropped: it can never share more). Without slot affinity
(``pinned`` false) llama.cpp picks the slot, so a request reuses only while every state
known is its own scope's.
"""

from __future__ import annotations

import json
from bisect import bisect_left, insort
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

__all__ = ["SAVED_CHARS", "SlotTable", "common_prefix", "render_chat"]

_SEP = "\x1e"
_UNKNOWN = "\x00unknown"
"""The scope of a slot whose contents are not known (a request failed in it, an embedding
ran there): no request's scope, so none reuses it until one has filled it afresh."""
SAVED_CHARS = 16 << 20
"""Characters of saved states remembered (llama.cpp's default 8 GiB cache holds about 370k
tokens of SmolLM2-135M, the smallest model's state per token; bigger models hold fewer)."""


def render_chat(messages: Any, tools: Any = None) -> str:
    """A chat body's prompt as text whose prefixes follow the prompt's: each message's
    role and text in order (tools first: a template puts them before the messages)."""
    out = [json.dumps(tools, sort_keys=True) + _SEP] if tools else []
    for m in messages or ():
        out.append(render_answer(m.get("content"), m.get("role", "")) if isinstance(m, dict) else _SEP)
        if isinstance(m, dict) and m.get("tool_calls"):
            out[-1] = out[-1][:-1] + json.dumps(m["tool_calls"], sort_keys=True) + _SEP
    return "".join(out)


def render_answer(content: Any, role: str = "assistant") -> str:
    """One message as :func:`render_chat` writes it (an answer, as the next turn repeats it)."""
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return f"{role}\n{content if isinstance(content, str) else ''}{_SEP}"


def common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix of ``a`` and ``b`` (slice comparisons, in C)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class _SavedStates:
    """The states llama.cpp's prompt cache may hold, with their scopes, kept sorted by text:
    the states that start with a prompt's first characters are found by bisection (they
    sort together), not by a scan, so a request costs the same however many are kept."""

    _WALK = 8  # neighbours looked at to drop a state another of its scope extends (memory only)

    def __init__(self) -> None:
        self._order: OrderedDict[tuple[str, str], None] = OrderedDict()  # (text, scope), oldest first
        self._sorted: list[tuple[str, str]] = []  # (text, scope)
        self._scopes: dict[str, int] = {}
        self.chars = 0

    def add(self, scope: str, text: str) -> None:
        key = (text, scope)
        if key in self._order:
            self._order.move_to_end(key)
            return
        i = bisect_left(self._sorted, key)
        for later, s in self._sorted[i:i + self._WALK]:  # those extending ``text`` sort just after it
            if s == scope and later.startswith(text):
                return  # one of its scope shares all ``text`` shares, and more
        # its prefixes sort before it (and whatever lies between starts with them)
        extended = [k for k in self._sorted[max(0, i - self._WALK):i] if k[1] == scope and text.startswith(k[0])]
        for k in extended:
            self.remove(k)
        insort(self._sorted, key)
        self._order[key] = None
        self._scopes[scope] = self._scopes.get(scope, 0) + 1
        self.chars += len(text)
        while self.chars > SAVED_CHARS and len(self._order) > 1:
            self.remove(next(iter(self._order)))

    def remove(self, key: tuple[str, str]) -> None:
        del self._order[key]
        del self._sorted[bisect_left(self._sorted, key)]
        self._scopes[key[1]] -= 1
        if not self._scopes[key[1]]:
            del self._scopes[key[1]]
        self.chars -= len(key[0])

    def foreign(self, head: str, scope: str) -> bool:
        """Some state of another scope than ``scope`` starts with ``head``."""
        i = bisect_left(self._sorted, (head, ""))
        while i < len(self._sorted) and self._sorted[i][0].startswith(head):
            if self._sorted[i][1] != scope:
                return True
            i += 1
        return False

    def only(self, scope: str) -> bool:
        """Every state kept is of ``scope``."""
        return not self._scopes.keys() - {scope}


@dataclass(slots=True)
class _Slot:
    held: str = ""  # what its cache holds: the last prompt, then its answer
    prompt: int = 0  # characters of ``held`` that were prompt (the next turn repeats them)
    used: int = -1  # when it was last chosen (a counter): least recently used goes first
    busy: bool = False
    scope: str | None = None  # the cache scope whose request filled it (None: never used)
    asker: str = ""  # the scope of the request running in it
    reuse: bool = False  # that request may reuse what llama.cpp holds


class SlotTable:
    """The slots of one loaded model (see the module docstring)."""

    def __init__(self, slots: int, *, saves: bool = True, pinned: bool = True) -> None:
        """``saves``: llama.cpp's host-memory prompt cache is on; ``pinned``: requests run in
        the slot chosen here (``id_slot``), else llama.cpp picks it."""
        self._slots = [_Slot() for _ in range(max(1, slots))]
        self._clock = 0
        self._saves, self._pinned = saves, pinned
        self._saved = _SavedStates()

    def choose(self, prompt: str, scope: str = "") -> int | None:
        """Mark the best idle slot for ``prompt`` of ``scope`` busy and return its id; None
        when all are busy. :meth:`reuses` then says whether the request may reuse a prefix."""
        idle = [i for i, s in enumerate(self._slots) if not s.busy]
        if not idle:
            return None
        best: tuple[int, int] | None = None  # (characters shared, slot)
        for i in idle:
            s = self._slots[i]
            if s.prompt and s.scope == scope and (shared := common_prefix(s.held, prompt)) >= s.prompt:
                if best is None or shared > best[0]:
                    best = (shared, i)
        if best is not None:
            chosen = best[1]
        else:
            empty = [i for i in idle if not self._slots[i].held]
            chosen = empty[0] if empty else min(idle, key=lambda i: self._slots[i].used)
        self._clock += 1
        slot = self._slots[chosen]
        slot.busy, slot.used, slot.asker = True, self._clock, scope
        slot.reuse = self._reusable(chosen, prompt, scope)
        if self._saves and slot.held:  # taking the slot, llama.cpp saves what it held
            self._saved.add(_UNKNOWN if slot.scope is None else slot.scope, slot.held)
        return chosen

    def fields(self, slot_id: int) -> dict[str, Any]:
        """What llama.cpp's request body says of the slot :meth:`choose` gave: ``id_slot``
        (when pinned), and ``cache_prompt: false`` where it may not reuse a prefix."""
        out: dict[str, Any] = {"id_slot": slot_id} if self._pinned else {}
        if not self._slots[slot_id].reuse:
            out["cache_prompt"] = False
        return out

    def clear(self) -> None:
        """A fresh server: every slot is empty, nothing is saved."""
        self._slots = [_Slot() for _ in self._slots]
        self._clock = 0
        self._saved = _SavedStates()

    def reuses(self, slot_id: int) -> bool:
        """Whether the request :meth:`choose` put in ``slot_id`` may reuse a cached prefix
        (else send it with ``cache_prompt: false``; see the module docstring)."""
        return self._slots[slot_id].reuse

    def _reusable(self, chosen: int, prompt: str, scope: str) -> bool:
        if not self._pinned:  # any slot, any saved state may be the one llama.cpp reuses
            return all(s.scope == scope for s in self._slots if s.held) and self._saved.only(scope)
        slot = self._slots[chosen]
        if slot.scope is not None and slot.scope != scope:
            return False
        if not self._saves:
            return True
        mine = common_prefix(slot.held, prompt)
        if mine >= len(prompt):  # the slot holds the whole prompt: nothing can share more
            return True
        head = prompt[:mine + 1]  # what a state sharing more than the slot starts with
        if any(i != chosen and s.held.startswith(head) and s.scope != scope for i, s in enumerate(self._slots)):
            return False  # another slot's state (llama.cpp may have saved it, or save it idle)
        return not self._saved.foreign(head, scope)

    def release(self, slot_id: int, prompt: str, answer: str = "") -> None:
        """The request in ``slot_id`` ended: the slot holds ``prompt`` then ``answer`` (an
        answer cut short leaves what was generated; a request that failed before running,
        pass ``prompt=""``: nothing is known to be cached)."""
        slot = self._slots[slot_id]
        slot.busy = False
        slot.held, slot.prompt = prompt + answer, len(prompt)
        slot.scope = slot.asker if prompt else _UNKNOWN  # failed: it may still hold what it held

    def borrow(self) -> int | None:
        """Mark busy the idle slot llama.cpp gives a request that names none (an embedding):
        the least recently used (one never used first); None when all are busy."""
        idle = [i for i, s in enumerate(self._slots) if not s.busy]
        if not idle:
            return None
        chosen = min(idle, key=lambda i: self._slots[i].used)
        self._clock += 1
        slot = self._slots[chosen]
        slot.busy, slot.used = True, self._clock
        return chosen

    def give_back(self, slot_id: int, *, kept: bool, inputs: Any = ()) -> None:
        """The embedding in ``slot_id`` ended; ``kept``: the slot still holds what it held
        (restored from llama.cpp's prompt cache), else it holds nothing known. The embedded
        ``inputs`` (of no known scope) may be in the slot or in that cache: a prompt sharing
        more with one than with its own slot never reuses a prefix there."""
        slot = self._slots[slot_id]
        slot.busy = False
        if not kept:  # it holds the embedding's tokens: no request's to reuse
            slot.held, slot.prompt, slot.scope = "", 0, _UNKNOWN
        for text in inputs if self._saves else ():
            if isinstance(text, str) and text:
                self._saved.add(_UNKNOWN, text)

    def holding(self) -> list[int]:
        """Characters each slot is known to hold (for logs and tests)."""
        return [len(s.held) for s in self._slots]
